"""What checking a node's data version costs per epoch, against the epoch itself, same run.

    python benchmarks/data_versions.py [--quick] [--repeats N]

A node fingerprints every file of its local sources when the run starts and checks them
twice an epoch, before and after `analyze` (flame.data.versions: stat, plus SHA-256 of each
file's first MiB). For folders of 1, 100 and 1,000 small CSV files (~4 KB) and of 1 and 100
large ones (2 MiB: the hash reads 1 MiB of each), this prints, from one run:
* the two checks of an epoch (median of the repeats; the one-off `take` beside them),
* the epoch of an analysis in its isolated child (`ChildRunner`, data folder hidden) that
  reads every file with `data.read_csv` and sums a column: the epoch the checks guard,
* the epoch of a tiny analysis in the same child (it reads nothing): the floor of any epoch,
and the checks' cost as a ratio to each. No target: the figures say whether it matters.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from data import isolated_runner  # the isolated child data.py's read runs in

READ_ALL = """\
def analyze(data):
    total = 0.0
    for name in data.files():
        total += float(sum(data.read_csv(name)["v"]))
    return {"total": total}

def aggregate(results):
    return results
"""

TINY = """\
def analyze(data):
    return {"n": 1}

def aggregate(results):
    return results
"""


def write_folder(folder: Path, files: int, size: int) -> None:
    """`files` CSV files of about `size` bytes each (one column `v` of short numbers)."""
    folder.mkdir()
    rows = max(1, size // 8)
    body = "v\n" + "".join(f"{i % 1000}.{i % 97:02d}\n" for i in range(rows))
    for i in range(files):
        (folder / f"part-{i:05d}.csv").write_text(body)


def _median_seconds(call: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def epoch_seconds(code: str, folder: Path, repeats: int) -> float:
    """Median epoch of `code`'s analyze in its isolated child over `folder` (one warm-up)."""
    runner = isolated_runner(folder, code)
    try:
        runner.run(0, None)  # warm: imports in the child, page cache
        epoch = iter(range(1, repeats + 1))
        return _median_seconds(lambda: runner.run(next(epoch), None), repeats)
    finally:
        runner.close()


def checks_seconds(folder: Path, repeats: int) -> tuple[float, float]:
    """(one `take`, the median of an epoch's two `check`s) for the folder as a local source."""
    from flame.data.sources.local import LocalSource
    from flame.data.versions import DataVersions

    start = time.perf_counter()
    versions = DataVersions.take({"default": LocalSource(folder)})
    take = time.perf_counter() - start

    def epoch() -> None:
        versions.check()  # before analyze
        versions.check()  # after analyze

    return take, _median_seconds(epoch, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, no 1,000 files")
    parser.add_argument("--repeats", type=int, default=0, help="default 9 (--quick: 3)")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 9)
    cases = [(1, 4096), (100, 4096), (1000, 4096), (1, 2 << 20), (100, 2 << 20)]
    if args.quick:
        cases = [(1, 4096), (100, 4096), (1, 2 << 20), (10, 2 << 20)]
    print(f"data version checks per epoch (two), median of {repeats}; times in ms")
    header = ("files", "take", "2 checks", "read-all epoch", "ratio", "tiny epoch", "ratio")
    print(f"{header[0]:<18}{header[1]:>8}{header[2]:>10}{header[3]:>16}{header[4]:>7}"
          f"{header[5]:>12}{header[6]:>7}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="flame-bench-versions-") as tmp:
        work = Path(tmp)
        tiny_folder = work / "tiny"
        write_folder(tiny_folder, 1, 16)
        tiny = epoch_seconds(TINY, tiny_folder, repeats)
        for files, size in cases:
            folder = work / f"f{files}x{size}"
            write_folder(folder, files, size)
            take, checks = checks_seconds(folder, repeats)
            read_all = epoch_seconds(READ_ALL, folder, repeats)
            label = f"{files:,} x {size // 1024:,} KiB"
            print(
                f"{label:<18}{take * 1e3:>8.1f}{checks * 1e3:>10.1f}{read_all * 1e3:>16.1f}"
                f"{checks / read_all:>7.2f}{tiny * 1e3:>12.1f}{checks / tiny:>7.1f}"
            )
    print(
        "ratio: the two checks over that epoch (read-all: an analysis reading every file; "
        "tiny: one reading nothing, the floor of an epoch in the isolated child)"
    )


if __name__ == "__main__":
    main()
