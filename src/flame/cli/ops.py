"""Operator commands (init, check, status), kept apart from the analyst's commands.

These are the CLI: they print. The modules they call (scaffold, check, status) return data
and never print, so the same checks and queries serve Python callers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from flame.utils.printable import escape_controls

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------- init


def _cmd_init(args: argparse.Namespace) -> int:
    from flame.ops import scaffold

    if args.list:
        for name in scaffold.examples():
            print(name)
        return EXIT_OK
    if args.dir is None:
        _err("flame: error: init needs a folder (flame init DIR)")
        return EXIT_USAGE
    try:
        made = scaffold.init(args.dir, args.example, force=args.force)
    except scaffold.ScaffoldError as exc:
        _err(f"flame: error: {exc}")
        return EXIT_USAGE
    _err(f"wrote {len(made.files)} files ({made.source}) to {made.root}")
    for step in made.next_steps():
        _err(f"next: {step}")
    return EXIT_OK


# --------------------------------------------------------------------------------- check


def _cmd_check(args: argparse.Namespace) -> int:
    from flame.ops import check

    report = check.run_checks(timeout=args.timeout)
    for item in report.items:
        print(item.line(), flush=True)
    if report.failed:
        _err(f"flame check: {len(report.failed)} of {len(report.items)} checks failed")
        return EXIT_FAILED
    return EXIT_OK


# --------------------------------------------------------------------------------- status


def _cmd_status(args: argparse.Namespace) -> int:
    from flame.config import load_config
    from flame.errors import RunTimeout
    from flame.ops import status as st
    from flame.ops.status_storage import failure_record

    client = st.StatusClient(load_config())
    if args.watch:
        run: st.RunStatus | None = None
        try:
            for change in client.watch(args.analysis_id, timeout=args.timeout):
                if change.kind == "watching":
                    _err(f"watching analysis {args.analysis_id} (Ctrl-C to stop)")
                    continue
                print(escape_controls(st.render_change(change)), flush=True)
                run = change.run if change.kind == "end" else run
        except RunTimeout as exc:
            _err(f"flame status: {exc}")
            return EXIT_FAILED
        assert run is not None
        for line in st.render_status(run):
            print(escape_controls(line), flush=True)
        code = EXIT_FAILED if run.state == "failed" else EXIT_OK
    else:
        run = client.status(args.analysis_id)
        if args.json:
            print(json.dumps(run.to_dict(), indent=2))
        else:
            for line in st.render_status(run):
                print(escape_controls(line))
            logs = client.forwarded_logs(args.analysis_id) if args.logs else None
            failed = client.has_storage and run.state == "failed"
            failure = failure_record(
                client._storage() if failed else None, args.analysis_id, client.config
            )
            for line in _outcome_details(run, logs=args.logs, forwarded=logs, failure=failure):
                print(escape_controls(line))  # node-written text: no control sequence shown
        code = EXIT_FAILED if run.problems and not (run.nodes or run.history) else EXIT_OK
    if args.download is not None:
        final = client.download(args.analysis_id, args.download)
        _err(
            f"downloaded {final.location} to {args.download}: {final.size} bytes, "
            f"sha256 {final.sha256} verified"
        )
    return code


def _outcome_details(
    run: Any,
    *,
    logs: bool,
    forwarded: list[str] | None = None,
    failure: dict[str, Any] | None = None,
) -> list[str]:
    """Beyond the statuses' one line (which every roster member reads, so it names only the
    exception type): the failure record the aggregator kept in storage (reason, traceback);
    with --logs, the nodes' forwarded log lines, also kept in storage."""
    lines: list[str] = []
    if failure is not None:
        lines.append(f"the failure: {str(failure.get('reason'))[:2000]}")
        traceback_text = failure.get("traceback")
        if isinstance(traceback_text, str) and traceback_text:
            lines += ["the failing analysis:", *("  " + t for t in traceback_text.splitlines())]
    if logs:
        if forwarded:
            lines += ["node logs (latest):", *(f"  {str(line)[:400]}" for line in forwarded)]
        else:
            lines.append(
                "node logs: none kept (a node forwards only if its policy allows; the "
                "aggregator keeps them in its storage, configure FLAME_STORAGE__* to read them, "
                "unless the claim check shares that storage with the nodes: then only in the "
                "aggregator's own log)"
            )
    return lines


def add_commands(commands: argparse._SubParsersAction[Any]) -> None:
    """Register the operator sub-commands on the `flame` parser."""
    init = commands.add_parser(
        "init",
        help="write a runnable analysis (templates + data, or an example) into DIR",
        description="Write the templates with a small data folder (or an example with its "
        "data) into DIR, from files shipped inside flame: no network needed. Then run "
        "`flame simulate DIR --data DIR/data` (an example with a nodes.toml: `--nodes`).",
    )
    init.add_argument("dir", type=Path, nargs="?", help="the folder to create")
    init.add_argument("--example", metavar="NAME", help="an example instead of the templates")
    init.add_argument("--list", action="store_true", help="list the examples and exit")
    init.add_argument("--force", action="store_true", help="write into a non-empty folder")
    init.set_defaults(handler=_cmd_init)

    chk = commands.add_parser(
        "check",
        help="check this node's config, tokens, broker, data sources and storage",
        description="One line per item (ok / FAIL: reason and fix); exit 1 if any failed. "
        "Reads the same FLAME_* settings as `flame run`; writes nothing anywhere.",
    )
    chk.add_argument(
        "--timeout", type=float, default=5.0, help="seconds per connection attempt (default 5)"
    )
    chk.set_defaults(handler=_cmd_check)

    st = commands.add_parser(
        "status",
        help="show a run: node states, epochs, final result; --watch follows it live",
        description="Reads the nodes' retained status from the broker and the run's history "
        "and final result from storage (FLAME_BROKER__*, FLAME_STORAGE__* as for `flame run`).",
    )
    st.add_argument("analysis_id", help="the analysis (FLAME_ANALYSIS_ID of the run)")
    st.add_argument("--watch", action="store_true", help="follow the run until it ends")
    st.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="--watch: give up after this many seconds (default: presence + epochs x epoch "
        "timeout)",
    )
    st.add_argument(
        "--download", type=Path, metavar="PATH", help="fetch the final result, verify SHA-256"
    )
    st.add_argument("--json", action="store_true", help="print the status as JSON")
    st.add_argument(
        "--logs",
        action="store_true",
        help="the nodes' latest forwarded log lines (nodes whose policy sets forward_logs)",
    )
    st.set_defaults(handler=_cmd_status)
