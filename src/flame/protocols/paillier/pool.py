"""The shared pool of worker processes that make obfuscators for large vectors."""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor

__all__ = ["available_cores", "process_pool", "shutdown_workers"]

logger = logging.getLogger(__name__)


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


_POOL_LOCK = threading.Lock()
_PROCESS_POOLS: dict[int, ProcessPoolExecutor] = {}


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A shared pool of `workers` processes, started on first use and kept for later calls.

    "spawn", not "fork": the federated layer runs broker and timer threads, and forking a
    threaded process can deadlock the child. The usual multiprocessing rule follows: a
    script that encrypts large vectors must guard its entry point with
    ``if __name__ == "__main__":``.
    """
    with _POOL_LOCK:
        pool = _PROCESS_POOLS.get(workers)
        if pool is None:
            pool = ProcessPoolExecutor(
                max_workers=workers, mp_context=multiprocessing.get_context("spawn")
            )
            _PROCESS_POOLS[workers] = pool
            logger.debug("started %d Paillier worker processes", workers)
        return pool


def shutdown_workers() -> None:
    """Stop the worker processes (they are restarted on demand)."""
    with _POOL_LOCK:
        pools = list(_PROCESS_POOLS.values())
        _PROCESS_POOLS.clear()
    for pool in pools:
        pool.shutdown(wait=True, cancel_futures=True)


def drop_pool(workers: int, pool: ProcessPoolExecutor) -> None:
    with _POOL_LOCK:
        if _PROCESS_POOLS.get(workers) is pool:
            del _PROCESS_POOLS[workers]
    pool.shutdown(wait=False, cancel_futures=True)
