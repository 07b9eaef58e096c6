"""The `flame` command: simulate, run, keys, init, check, status. The only module that prints."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from flame.errors import (
    ConfigError,
    FlameError,
    RunFailed,
    RunTimeout,
    stop_exit_code,
    stop_signal,
)
from flame.utils import logs as _logging
from flame.utils.signals import stop_on_sigterm

if TYPE_CHECKING:
    from flame.aggregator.records import Event

# Commands import what they need when they run: `flame --version` and `flame --help` stay
# free of pydantic, numpy and the network clients (benchmarks/startup.py measures it).

EXIT_FAILED = 1
EXIT_USAGE = 2


class _FailureOnce:
    """Text logs on the CLI: the aggregator's log line of a node's failure is dropped, because
    `main` prints the same failure (and its traceback) as `flame: error:` right after. JSON
    logs keep that line: a collector indexes it, a person reads the `flame: error:` line."""

    active = False

    @classmethod
    def install(cls, handler: Any, fmt: str) -> None:
        cls.active = fmt != "json"
        if cls.active:
            handler.addFilter(lambda record: not getattr(record, "run_failure", False))


def _frames(traceback_text: object, reason: str) -> str:
    """A failing analysis's traceback without its last line when `reason` already says it."""
    if not isinstance(traceback_text, str):
        return ""
    lines = traceback_text.rstrip("\n").splitlines()
    if lines and lines[-1].strip():
        kind, sep, message = lines[-1].strip().partition(": ")
        if kind.rpartition(".")[2] + sep + message in reason:  # flame.errors.X: -> X:
            lines.pop()
    return "\n".join(lines) if any(line.strip() for line in lines) else ""


def _configure_logs(**kwargs: Any) -> None:
    _FailureOnce.install(_logging.configure(**kwargs), str(kwargs.get("fmt", "text")))


class _Progress:
    """Per-epoch progress: a live line on a terminal, plain lines otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.live = stream.isatty()
        self.started = time.perf_counter()
        self.answered: list[str] = []

    def __call__(self, event: Event) -> None:
        if event.kind == "epoch_started":
            self.answered = []
            self._live(f"epoch {event.epoch}: waiting for {event.expected} nodes")
        elif event.kind == "result" and event.node is not None:
            self.answered.append(event.node)
            self._live(f"epoch {event.epoch}: {event.received}/{event.expected} answered")
        elif event.kind == "epoch_finished" and event.record is not None:
            record = event.record
            missing = f", missing {', '.join(record.missing)}" if record.missing else ""
            flag = ", converged" if record.converged else ""
            self._line(
                f"epoch {record.epoch}: {len(record.nodes)} nodes answered "
                f"({', '.join(record.nodes)}){missing} in {record.duration:.3f} s{flag}"
            )

    def _live(self, text: str) -> None:
        if self.live:
            self.stream.write(f"\r\033[K{text}")
            self.stream.flush()

    def _line(self, text: str) -> None:
        self.stream.write(("\r\033[K" if self.live else "") + text + "\n")
        self.stream.flush()


def _warm_children(args: argparse.Namespace) -> None:
    """Start the analysis fork server now: it imports while we do (see forkserver)."""
    if args.in_process:
        return
    from flame.isolation.forkserver import prestart_server

    folder = args.analysis if args.analysis.is_dir() else args.analysis.parent
    prestart_server(read=[str(folder)], analysis=str(args.analysis))


def _cmd_simulate(args: argparse.Namespace) -> int:
    _warm_children(args)
    from flame.analysis.loader import load_analysis
    from flame.config import load_config
    from flame.ops.run_output import strict_json
    from flame.simulate import simulate

    if args.output is not None and not args.output.parent.is_dir():
        raise FlameError(f"--output {args.output}: folder {args.output.parent} does not exist")
    config = load_config(epochs=args.epochs, seed=args.seed, epoch_timeout=args.timeout)
    _configure_logs(
        level=config.log_level if not args.verbose else "DEBUG",
        fmt=config.log_format,
        secrets=config.secrets(),
    )
    analysis = load_analysis(args.analysis)
    import gc

    gc.freeze()  # what is loaded by now lives to the end: a hundred node threads' collections
    progress = None if args.quiet else _Progress(sys.stderr)  # need not scan it again
    with contextlib.ExitStack() as stack:
        broker_url = args.broker
        if broker_url == "embedded":
            from flame.transport.embedded import EmbeddedBroker

            broker_url = stack.enter_context(EmbeddedBroker())
        broker = None
        if broker_url is not None:
            from flame.transport.mqtt import mqtt_transport_factory

            settings = config.broker.model_copy(update={"url": broker_url})
            broker = mqtt_transport_factory(settings, config.analysis_id)
        stack.enter_context(stop_on_sigterm())
        try:
            result = simulate(
                analysis.functions.analyze,
                analysis.functions.aggregate,
                analysis.functions.converged,
                data=args.data,
                nodes=args.nodes,
                params=_params(args.param),
                config=config,
                broker=broker,
                on_event=progress,
                secure=args.secure,
                isolate=not args.in_process,
                policy=_policy_arguments(args.policy),
                output=args.output,
                aggregator_policy=args.aggregator_policy,
            )
        except (RunFailed, RunTimeout):
            _wrote(args.output)
            raise
    _wrote(args.output)
    converged = ", converged" if result.converged else ""
    print(f"finished after {result.epochs} epoch(s){converged}", file=sys.stderr)
    print(json.dumps(strict_json(result.to_dict()["result"]), indent=2))
    return 0


def _wrote(output: Path | None) -> None:
    if output is not None and output.is_file():
        print(f"wrote {output} (see it as a page: flame report {output})", file=sys.stderr)


def _policy_arguments(items: list[str]) -> Any:
    """`--policy FILE` (all nodes) and/or `--policy NODE=FILE` (one node) as simulate wants."""
    if not items:
        return None
    every = [item for item in items if "=" not in item]
    if len(every) > 1:
        raise FlameError("--policy FILE may be given once; use NODE=FILE for single nodes")
    if not any("=" in item for item in items):
        return Path(every[0])
    named = dict(item.split("=", 1) for item in items if "=" in item)
    return _PerNode(Path(every[0]) if every else None, named)


class _PerNode(dict[str, Any]):
    """Per-node policies; nodes not named get the common file (or none)."""

    def __init__(self, common: Path | None, named: dict[str, str]) -> None:
        super().__init__({node: Path(path) for node, path in named.items()})
        self.common = common

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key, self.common)


def _params(items: list[str]) -> dict[str, Any]:
    """`--param key=value` pairs; a value that parses as JSON (10, 0.5, true, [1]) is typed."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--param {item!r}: expected KEY=VALUE")
        try:
            params[key.strip()] = json.loads(text)
        except ValueError:
            params[key.strip()] = text
    return params


def _cmd_run(args: argparse.Namespace) -> int:
    from flame.analysis.code_hash import analysis_code_hash
    from flame.analysis.loader import load_analysis
    from flame.config import load_config
    from flame.main import run
    from flame.ops.run_output import strict_json
    from flame.privacy.policy import load_policy
    from flame.wire.envelope import to_jsonable

    config = load_config()
    _configure_logs(
        level=config.log_level,
        fmt=config.log_format,
        secrets=config.secrets(),
        analysis_id=config.analysis_id,
        node_id=config.node_id or "",
    )
    if config.role == "analysis" and load_policy(config.policy).isolate:
        # The analysis is imported only in its isolated child, never next to the keys.
        from flame.analysis.loader import analysis_files
        from flame.isolation.runner import AnalysisAt

        analysis_files(args.analysis)  # a wrong path fails here, before connecting
        placeholder = AnalysisAt(args.analysis)  # a read-only snapshot of the hashed files
        code = placeholder.code  # the snapshot's hash: what runs is what is approved
        value: Any = run(placeholder, placeholder, config=config, code=code)
    else:
        if config.role == "analysis":  # not isolated: still only reviewed files may load
            from flame.analysis.snapshot import refuse_unreviewed

            refuse_unreviewed(args.analysis)
        analysis = load_analysis(args.analysis)
        value = run(
            analysis.functions.analyze,
            analysis.functions.aggregate,
            analysis.functions.converged,
            config=config,
            code=analysis_code_hash(args.analysis),
        )
    print(json.dumps(strict_json(to_jsonable(value))))
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    if args.rest[:1] == ["identity"]:
        from flame.cli.auth import keys_identity

        return keys_identity(args.rest[1:])
    from flame.cli.keys import keys_cli

    return int(keys_cli(args.rest))


def _secure_mode(text: str) -> str:
    """`--secure threshold[:T]`; anything else is an error that says where the analysis goes."""
    from flame.secure.simulation_keys import parse_secure

    try:
        parse_secure(text)
    except ConfigError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected threshold or threshold:T (plain --secure takes no value; "
            "give the analysis before it)"
        ) from None
    return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flame", description="Federated analytics: analyze() on each node, aggregate() once."
    )
    from flame import __version__

    parser.add_argument("--version", action="version", version=f"flame {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sim = commands.add_parser("simulate", help="run an analysis on N simulated nodes locally")
    sim.add_argument("analysis", type=Path, help="a .py file or a folder (e.g. copied templates)")
    where = sim.add_mutually_exclusive_group(required=True)
    where.add_argument("--data", type=Path, help="folder with one sub-folder per node")
    where.add_argument(
        "--nodes", type=Path, help="TOML file: each node's own sources (folder, FHIR, SQL, S3)"
    )
    sim.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run parameter for flame.context().params (JSON value or text; repeatable; "
        "over FLAME_PARAMS)",
    )
    sim.add_argument("--epochs", type=int, help="maximum number of epochs (FLAME_EPOCHS)")
    sim.add_argument("--seed", type=int, help="seed for context().rng (FLAME_SEED)")
    sim.add_argument("--timeout", type=float, help="seconds per epoch (FLAME_EPOCH_TIMEOUT)")
    sim.add_argument("--output", type=Path, help="write result and per-epoch history as JSON")
    sim.add_argument(
        "--secure",
        nargs="?",
        const=True,
        default=False,
        type=_secure_mode,
        metavar="threshold[:T]",
        help="sum flame.secure(...) values under Paillier encryption (FLAME_SECURE__*; "
        "throwaway keys if none configured); 'threshold[:T]' deals throwaway threshold "
        "shares, one per node, any T decrypt (default: a majority)",
    )
    sim.add_argument(
        "--broker",
        metavar="URL",
        help="run over a real MQTT broker (mqtt://host:port), or 'embedded' to start a local one",
    )
    sim.add_argument(
        "--policy",
        action="append",
        default=[],
        metavar="[NODE=]FILE",
        help="node policy file for every node, or NODE=FILE for one node (repeatable)",
    )
    sim.add_argument(
        "--aggregator-policy",
        type=Path,
        metavar="FILE",
        help="the aggregator's policy: its budget for central DP (flame.dp markers in what "
        "aggregate returns; without one they are refused)",
    )
    sim.add_argument(
        "--in-process",
        action="store_true",
        help="run analyze in this process instead of an isolated child per node (debugging)",
    )
    sim.add_argument("--quiet", action="store_true", help="no progress lines")
    sim.add_argument("--verbose", action="store_true", help="debug logging")
    sim.set_defaults(handler=_cmd_simulate)

    run = commands.add_parser("run", help="play this node's role (config from FLAME_* / file)")
    run.add_argument("analysis", type=Path, nargs="?", default=Path("."), help="default: .")
    run.set_defaults(handler=_cmd_run)

    keys = commands.add_parser(
        "keys",
        help="keys: flame keys identity NODE_ID --out DIR | generate --out DIR (Paillier)",
    )
    keys.add_argument("rest", nargs=argparse.REMAINDER)
    keys.set_defaults(handler=_cmd_keys)

    from flame.cli.ops import add_commands
    from flame.cli.report import add_command as add_report

    add_commands(commands)
    add_report(commands)

    from flame.cli.auth import add_commands as add_auth_commands

    add_auth_commands(commands)
    from flame.cli.deploy import add_commands as add_deploy_commands

    add_deploy_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 success, 1 run failed, 2 bad input, 130 SIGINT,
    143 SIGTERM)."""
    args = _parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        lines = str(exc).splitlines() or ["invalid configuration"]
        for line in lines:
            print(f"flame: config error: {line}", file=sys.stderr)
        return EXIT_USAGE
    except FlameError as exc:
        # The failing analysis's traceback, when its node sent one, is in the aggregator's log.
        if _FailureOnce.active:  # its log line was dropped: the frames, then the one error
            frames = _frames(getattr(exc, "traceback", None), str(exc))
            if frames:
                print(frames, file=sys.stderr)
        print(f"flame: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt as exc:  # SIGINT, or SIGTERM (see flame.utils.signals)
        print(f"flame: stopped: {stop_signal(exc)}", file=sys.stderr)
        return stop_exit_code(exc)
