"""Start-up time of the `flame` command against a bare `python -c pass`, in the same run.

    python benchmarks/startup.py [--repeats N]

Each command runs N times (default 15) as a fresh process, interleaved so machine noise hits
every command alike; the median wall time is reported with its ratio to the baseline. The
commands are what an analyst types first: `flame --version`, `flame --help`, and a tiny
`flame simulate` (two nodes, one CSV row each, one epoch), each through the installed
interpreter (`python -m flame`, which is what the `flame` script runs).

The last row is one isolated analysis child on its own (issue 20): spawn, Landlock allow-list
and seccomp, load the analysis, one `analyze`, stop; run this script on two checkouts to
compare the confinement's cost (the ratio to `python -c pass` is the figure to compare).

Targets (issue 15): --version and --help <= 0.25 s, the tiny simulate <= 0.8 s. Also checks
that --version loads neither pydantic nor numpy, and the simulation none of the network
clients (httpx, minio, paho, gmpy2).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = {"flame --version": 0.25, "flame --help": 0.25, "flame simulate (tiny)": 0.8}
# `flame simulate` runs each node's analyze in an isolated child process (one more Python
# start per node); --in-process shows what that isolation costs.

ANALYSIS = """\
def analyze(data):
    return {"n": sum(1 for _ in data.rows("x.csv"))}

def aggregate(results):
    return {"n": sum(r["n"] for r in results.values())}
"""


CHILD = """
import sys
sys.path.insert(0, sys.argv[1])
from analysis import analyze
from flame.data import Data
from flame.isolation.runner import ChildRunner
from flame.node.context import Context
ctx = Context(analysis_id="bench", node_id="n", role="analysis", participants=["n"],
              aggregator_id="agg", mailbox=None)
runner = ChildRunner(analyze, Data({}), ctx)
try:
    runner.run(0, None)
finally:
    runner.close()
"""

CHILD_ANALYSIS = """
def analyze(data, epoch=0, previous=None):
    return {"n": 1}
"""


def _tiny_analysis(root: Path) -> tuple[Path, Path]:
    (root / "analysis.py").write_text(ANALYSIS)
    for node in ("a", "b"):
        (root / "data" / node).mkdir(parents=True)
        (root / "data" / node / "x.csv").write_text("value\n1\n")
    return root / "analysis.py", root / "data"


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _time(argv: list[str]) -> tuple[float, float]:
    """Wall seconds, and CPU seconds of the command with all its (waited-for) children:
    the CPU figure hardly moves with machine load, the wall time does."""
    cpu = _cpu()
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, timeout=60)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {done.stderr.decode()[-500:]}")
    return elapsed, _cpu() - cpu


def _loaded(code: str) -> set[str]:
    probe = f"import sys; {code}; print(' '.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    return set(out.stdout.split())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        analysis, data = _tiny_analysis(Path(tmp))
        child_code = Path(tmp) / "child"
        child_code.mkdir()
        (child_code / "analysis.py").write_text(CHILD_ANALYSIS)
        commands = {
            "python -c pass": [py, "-c", "pass"],
            "flame --version": [py, "-m", "flame", "--version"],
            "flame --help": [py, "-m", "flame", "--help"],
            "flame simulate (tiny)": [
                py,
                "-m",
                "flame",
                "simulate",
                str(analysis),
                "--data",
                str(data),
                "--quiet",
            ],
            "flame simulate --in-process": [
                py,
                "-m",
                "flame",
                "simulate",
                str(analysis),
                "--data",
                str(data),
                "--quiet",
                "--in-process",
            ],
            "analysis child (1 run)": [py, "-c", CHILD, str(child_code)],
        }
        for argv in commands.values():  # warm the file cache and .pyc files
            _time(argv)
        times: dict[str, list[float]] = {name: [] for name in commands}
        cpus: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.repeats):
            for name, argv in commands.items():
                wall, cpu = _time(argv)
                times[name].append(wall)
                cpus[name].append(cpu)
    base = statistics.median(times["python -c pass"])
    print(
        f"{'command':<28} {'median s':>9} {'min s':>7} {'CPU s':>6} {'x python -c pass':>17} "
        f"{'target':>8}"
    )
    ok = True
    for name, samples in times.items():
        median = statistics.median(samples)
        cpu = statistics.median(cpus[name])
        target = TARGETS.get(name)
        met = target is None or median <= target
        ok &= met
        mark = "" if target is None else f"<= {target:g} {'ok' if met else 'MISSED'}"
        print(
            f"{name:<28} {median:>9.3f} {min(samples):>7.3f} {cpu:>6.3f} {median / base:>16.1f}x"
            f"  {mark}"
        )
    heavy = {"pydantic", "numpy", "pydantic_settings"} & _loaded(
        "from flame.cli.app import _parser; _parser()"
    )
    clients = {"httpx", "minio", "paho", "gmpy2", "phe"} & _loaded(
        "import flame.simulate, flame.cli"
    )
    print(f"modules loaded by --version/--help: {sorted(heavy) or 'no pydantic, no numpy'}")
    print(f"network clients loaded by simulate: {sorted(clients) or 'none'}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0 if ok and not heavy and not clients else 1


if __name__ == "__main__":
    raise SystemExit(main())
