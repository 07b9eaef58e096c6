"""Simulation at scale (issue 23 item 2): many tiny nodes, and one node set of real size.

    python benchmarks/simulate_scale.py [--nodes 100] [--w1] [--big 1000]

Rows, each run as a fresh process whose whole process tree is sampled every 50 ms (wall
time, CPU time of the tree, peak of the summed RSS and of the summed PSS, peak process
count):
- `flame simulate` (the CLI: isolated children forked per epoch from one fork server),
- `flame.simulate` in process on the same data, in the same run (the ratio to compare),
- Flower's simulation with as many clients, when `flwr` is importable (skipped otherwise),
- with --big N: `flame simulate` with N nodes (must finish),
- with --w1: W1, 10 nodes x 100k rows x 20 float columns (160 MB of floats) in process,
  peak RSS against the numeric size, next to a plain pyarrow read of the same files.
Targets: 100 tiny nodes in `flame simulate` <= 3 s and <= 1 GB; W1 in process <= 2x its
numeric size. Wall times depend on the machine's load: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ANALYSIS = """\
def analyze(data):
    rows = list(data.rows("x.csv"))
    return {"n": len(rows), "total": sum(float(r["v"]) for r in rows)}

def aggregate(results):
    return {"n": sum(r["n"] for r in results.values()),
            "total": sum(r["total"] for r in results.values())}
"""

IN_PROCESS = """\
import sys
sys.path.insert(0, ".")
import flame
from analysis import analyze, aggregate
print(flame.simulate(analyze, aggregate, data=sys.argv[1]).value)
"""

W1_ANALYSIS = """\
import numpy as np

def analyze(data):
    columns = data.read_csv()
    return {"n": int(len(columns["c0"])), "sums": [float(np.sum(columns[k])) for k in columns]}

def aggregate(results):
    return {"n": sum(r["n"] for r in results.values())}
"""

PYARROW_LOOP = """\
import sys, pathlib
import pyarrow.csv as pc
files = sorted(pathlib.Path(sys.argv[1]).glob("*/x.csv"))
kept = [pc.read_csv(p).to_pandas().to_numpy() for p in files]
print(sum(k.shape[0] for k in kept))
"""

FLOWER = """\
import sys
import numpy as np
from flwr.client import ClientApp, NumPyClient
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.simulation import run_simulation

class Tiny(NumPyClient):
    def __init__(self, cid):
        self.cid = cid
    def fit(self, parameters, config):
        return [np.array([float(self.cid)])], 1, {}

def client_fn(context: Context):
    return Tiny(int(context.node_config.get("partition-id", 0))).to_client()

def server_fn(context: Context):
    strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0,
                      min_available_clients=int(sys.argv[1]),
                      initial_parameters=ndarrays_to_parameters([np.zeros(1)]))
    return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=1))

run_simulation(server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
               num_supernodes=int(sys.argv[1]))
print("flower done")
"""


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [root], [root]
    while todo:
        more = children.get(todo.pop(), [])
        found += more
        todo += more
    return found


def _memory(pid: int) -> tuple[int, int]:
    """RSS and PSS of one process, in bytes (0 when it is gone)."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, pss


def measure(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> dict[str, float]:
    """Wall time, CPU time of the whole tree (user + system: what load on a shared machine
    barely changes), and the tree's peak summed RSS/PSS and process count."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    peak_rss = peak_pss = peak_count = 0
    while process.poll() is None:
        pids = _tree(process.pid)
        sizes = [_memory(p) for p in pids]
        peak_rss = max(peak_rss, sum(s[0] for s in sizes))
        peak_pss = max(peak_pss, sum(s[1] for s in sizes))
        peak_count = max(peak_count, len(pids))
        time.sleep(0.05)
    wall = time.perf_counter() - start
    out, err = process.communicate()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if process.returncode != 0:
        print(f"  failed ({process.returncode}): {err[-800:]}", file=sys.stderr)
    return {
        "wall": wall,
        "cpu": cpu,
        "rss": peak_rss / 2**20,
        "pss": peak_pss / 2**20,
        "processes": peak_count,
        "ok": float(process.returncode == 0),
        "out": out.strip()[-200:],  # type: ignore[dict-item]
    }


def _row(name: str, m: dict[str, float], base: dict[str, float] | None = None) -> None:
    ratio = (
        f"  {m['wall'] / base['wall']:.1f}x in-process time ({m['cpu'] / base['cpu']:.1f}x CPU)"
        if base
        else ""
    )
    print(
        f"{name:<44} {m['wall']:7.2f} s  CPU {m['cpu']:6.2f} s  RSS {m['rss']:6.0f} MB  "
        f"PSS {m['pss']:6.0f} MB  {int(m['processes']):4d} processes"
        f"{'' if m['ok'] else '  FAILED'}{ratio}"
    )


def tiny_nodes(folder: Path, count: int) -> Path:
    data = folder / f"data{count}"
    for i in range(count):
        (data / f"n{i:04d}").mkdir(parents=True, exist_ok=True)
        (data / f"n{i:04d}" / "x.csv").write_text(f"v\n{i}\n")
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--big", type=int, default=0, help="also run flame simulate with N nodes")
    parser.add_argument("--w1", action="store_true", help="also run W1 (writes ~375 MB of CSV)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "analysis.py").write_text(ANALYSIS)
        (folder / "inproc.py").write_text(IN_PROCESS)
        data = tiny_nodes(folder, args.nodes)
        flame_cli = [sys.executable, "-m", "flame", "simulate", "analysis.py", "--quiet"]
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"{args.nodes} tiny nodes, one epoch (load average {load})")
        inproc = measure([sys.executable, "inproc.py", data.name], folder)
        _row("flame.simulate in process", inproc)
        cli = measure([*flame_cli, "--data", data.name], folder)
        _row("flame simulate (isolated, fork server)", cli, inproc)
        per_node = measure(
            [*flame_cli, "--data", data.name], folder, {**os.environ, "FLAME_SIMULATE_WORKERS": "0"}
        )
        _row("flame simulate, one spawned child per node", per_node, inproc)
        if importlib.util.find_spec("flwr") is None:
            print("Flower's simulation: skipped (flwr is not importable)")
        else:
            (folder / "flower_sim.py").write_text(FLOWER)
            flower = measure([sys.executable, "flower_sim.py", str(args.nodes)], folder)
            _row("Flower run_simulation", flower, inproc)
            print(f"  flame simulate / Flower: {cli['wall'] / flower['wall']:.2f}x time")
        print(
            f"targets: <= 3 s ({'met' if cli['wall'] <= 3 else 'NOT met'}), <= 1 GB RSS "
            f"({'met' if cli['rss'] <= 1024 else 'NOT met'})"
        )
        if args.big:
            big = tiny_nodes(folder, args.big)
            _row(
                f"flame simulate, {args.big} nodes",
                measure([*flame_cli, "--data", big.name], folder),
            )
        if args.w1:
            w1(folder)


def w1(folder: Path) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pacsv

    rng = np.random.default_rng(0)
    data = folder / "w1"
    for i in range(10):
        (data / f"n{i}").mkdir(parents=True)
        table = pa.table({f"c{j}": rng.normal(size=100_000) for j in range(20)})
        pacsv.write_csv(table, data / f"n{i}" / "x.csv")
    numeric = 10 * 100_000 * 20 * 8 / 2**20
    (folder / "w1_analysis.py").write_text(W1_ANALYSIS)
    (folder / "w1_inproc.py").write_text(IN_PROCESS.replace("from analysis", "from w1_analysis"))
    (folder / "loop.py").write_text(PYARROW_LOOP)
    print(f"W1: 10 nodes x 100k rows x 20 float columns ({numeric:.0f} MB of floats)")
    base = measure([sys.executable, "-c", "import flame.simulate, numpy, pyarrow.csv"], folder)
    _row("interpreter + flame + numpy + pyarrow", base)
    loop = measure([sys.executable, "loop.py", "w1"], folder)
    _row("plain pyarrow loop (read_csv -> numpy)", loop)
    inproc = measure([sys.executable, "w1_inproc.py", "w1"], folder)
    _row("flame.simulate in process", inproc)
    print(
        f"  peak RSS / numeric size: {inproc['rss'] / numeric:.2f}x "
        f"(above the bare interpreter: {(inproc['rss'] - base['rss']) / numeric:.2f}x; "
        f"target <= 2x); vs pyarrow loop {inproc['rss'] / loop['rss']:.2f}x"
    )


if __name__ == "__main__":
    main()
