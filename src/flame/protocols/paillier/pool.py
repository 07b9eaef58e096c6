"""The shared worker processes that make obfuscators for large vectors.

Each worker is `python -m flame.protocols.paillier.worker`, started by flame's own module
path: it never imports the user's `__main__`, so encryption uses every core from a
script, from `python -` (stdin) and from a Jupyter kernel alike, with no
`if __name__ == "__main__":` guard. Workers run in their own session and ignore SIGINT,
so a kernel interrupt or shutdown prints no tracebacks from them; they exit when their
stdin closes, which happens at interpreter exit (atexit) or when this process dies.
No pickle crosses the pipe: ints go in as JSON, bytes come out (see worker.py).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import select
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from flame.protocols.paillier.worker import HEADER

__all__ = ["WorkerError", "WorkerPool", "available_cores", "process_pool", "shutdown_workers"]

logger = logging.getLogger(__name__)

START_TIMEOUT = 60.0  # seconds for a worker's first answer (it imports gmpy2 and numpy)
JOB_TIMEOUT = 600.0  # seconds for one chunk of obfuscators


class WorkerError(RuntimeError):
    """A worker process failed, refused a request or did not answer in time."""


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _worker_env() -> dict[str, str]:
    """The child finds this very flame first, even when it was put on sys.path by hand."""
    env = dict(os.environ)
    here = str(Path(__file__).resolve().parents[3])  # the folder holding the flame package
    env["PYTHONPATH"] = os.pathsep.join([here, *filter(None, [env.get("PYTHONPATH")])])
    return env


class _Worker:
    """One worker process and its pipes; used by one thread at a time (via the idle queue)."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "flame.protocols.paillier.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=_worker_env(),
            start_new_session=True,  # a terminal's or a kernel's SIGINT does not reach it
        )
        self.answered = False

    def request(self, kind: str, params: Sequence[int], count: int, width: int) -> bytes:
        assert self.process.stdin is not None
        line = json.dumps({"kind": kind, "params": list(params), "count": count, "width": width})
        try:
            self.process.stdin.write(line.encode() + b"\n")
            self.process.stdin.flush()
        except OSError as exc:
            raise WorkerError(f"worker {self.process.pid} is gone ({exc})") from None
        timeout = JOB_TIMEOUT + (0.0 if self.answered else START_TIMEOUT)
        deadline = time.monotonic() + timeout
        tag, size = HEADER.unpack(self._read(HEADER.size, deadline))
        payload = self._read(size, deadline)
        if tag != b"OK":
            raise WorkerError(f"worker {self.process.pid}: {payload.decode(errors='replace')}")
        if size != count * width:
            raise WorkerError(f"worker {self.process.pid} returned {size} bytes")
        self.answered = True
        return payload

    def _read(self, size: int, deadline: float) -> bytes:
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        parts: list[bytes] = []
        remaining = size
        while remaining:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise WorkerError(f"worker {self.process.pid} did not answer in time")
            chunk = os.read(fd, min(remaining, 1 << 20))
            if not chunk:
                raise WorkerError(f"worker {self.process.pid} exited (code {self.process.poll()})")
            parts.append(chunk)
            remaining -= len(chunk)
        return b"".join(parts)

    def stop(self, timeout: float = 5.0) -> None:
        """Close its stdin (it exits by itself); kill it if it does not within `timeout`."""
        for stream in (self.process.stdin, self.process.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=timeout)


class WorkerPool:
    """`size` worker processes, started on first use; any thread may call `generate`."""

    def __init__(self, size: int) -> None:
        self.size = max(1, int(size))
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False

    def _start(self) -> None:
        with self._lock:
            if self._closed:
                raise WorkerError("the worker pool was shut down")
            while len(self._all) < self.size:
                worker = _Worker()
                self._all.append(worker)
                self._idle.put(worker)
                logger.debug("started Paillier worker process %d", worker.process.pid)

    def _run(self, kind: str, params: Sequence[int], count: int, width: int) -> bytes:
        try:
            worker = self._idle.get(timeout=JOB_TIMEOUT)
        except queue.Empty:
            raise WorkerError("no Paillier worker became free in time") from None
        try:
            payload = worker.request(kind, params, count, width)
        except BaseException:
            self._discard(worker)
            raise
        self._idle.put(worker)
        return payload

    def _discard(self, worker: _Worker) -> None:
        with self._lock:
            if worker in self._all:
                self._all.remove(worker)
        worker.stop(timeout=1.0)

    def generate(
        self, kind: str, params: Sequence[int], sizes: Sequence[int], width: int
    ) -> list[bytes]:
        """One blob of `size` obfuscators per entry of `sizes`, made in parallel."""
        self._start()
        with ThreadPoolExecutor(self.size, thread_name_prefix="flame-paillier") as threads:
            futures = [threads.submit(self._run, kind, params, n, width) for n in sizes]
            return [f.result() for f in futures]

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            workers, self._all = self._all, []
        for worker in workers:
            worker.stop()


_POOL_LOCK = threading.Lock()
_PROCESS_POOLS: dict[int, WorkerPool] = {}


def process_pool(workers: int) -> WorkerPool:
    """The shared pool of `workers` processes, kept for later calls."""
    with _POOL_LOCK:
        pool = _PROCESS_POOLS.get(workers)
        if pool is None:
            pool = _PROCESS_POOLS[workers] = WorkerPool(workers)
        return pool


def shutdown_workers() -> None:
    """Stop the worker processes (they are restarted on demand)."""
    with _POOL_LOCK:
        pools = list(_PROCESS_POOLS.values())
        _PROCESS_POOLS.clear()
    for pool in pools:
        pool.shutdown()


def drop_pool(workers: int, pool: WorkerPool) -> None:
    with _POOL_LOCK:
        if _PROCESS_POOLS.get(workers) is pool:
            del _PROCESS_POOLS[workers]
    pool.shutdown()


atexit.register(shutdown_workers)
