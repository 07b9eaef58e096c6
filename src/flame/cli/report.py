"""`flame report RESULT.json|ANALYSIS_ID --out report.html` (prints; flame.ops.report renders)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def _cmd_report(args: argparse.Namespace) -> int:
    from flame.ops.report import write_report

    if not args.out.parent.is_dir():
        print(f"flame: error: --out {args.out}: folder {args.out.parent} does not exist",
              file=sys.stderr)  # fmt: skip
        return 2
    write_report(args.source, args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def add_command(commands: argparse._SubParsersAction[Any]) -> None:
    """Register `flame report` on the `flame` parser."""
    report = commands.add_parser(
        "report",
        help="one self-contained HTML page of a run: timeline per node, convergence, manifest",
        description="Render a run as one HTML file that loads nothing from the network: the "
        "epoch timeline per node (answered / missing / failed, arrival, bytes), epoch "
        "durations, the convergence of the aggregate's numbers, and the manifest. SOURCE is "
        "the JSON of `flame simulate --output`, or an analysis id read from the configured "
        "storage (FLAME_STORAGE__*).",
    )
    report.add_argument("source", metavar="RESULT.json|ANALYSIS_ID")
    report.add_argument(
        "--out", type=Path, default=Path("report.html"), help="default: report.html"
    )
    report.set_defaults(handler=_cmd_report)
