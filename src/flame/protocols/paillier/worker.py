"""A Paillier worker process: `python -m flame.protocols.paillier.worker`.

Why its own entry point: multiprocessing's spawn and forkserver start methods re-run the
parent's `__main__` in every worker, which breaks under `python -` (no main file) and
prints tracebacks when a Jupyter kernel shuts down. This worker is started by flame's own
module path, needs nothing from the user's program, and talks over its stdin/stdout:

    request:  one JSON line {"kind": str, "params": [int, ...], "count": int, "width": int}
    reply:    b"OK" or b"ER", an 8-byte big-endian length, then that many bytes
              (OK: `count` obfuscators of `width` bytes each; ER: a UTF-8 message)

No pickle: only ints go in and bytes come out. The worker ignores SIGINT (its parent owns
its lifetime) and exits quietly when its stdin closes.
"""

from __future__ import annotations

import contextlib
import json
import signal
import struct
import sys
from typing import BinaryIO

__all__ = ["HEADER", "MAX_REQUEST_BYTES", "serve"]

HEADER = struct.Struct(">2sQ")
MAX_REQUEST_BYTES = 1 << 20


def _reply(out: BinaryIO, tag: bytes, payload: bytes) -> None:
    out.write(HEADER.pack(tag, len(payload)))
    out.write(payload)
    out.flush()


def _answer(line: bytes) -> tuple[bytes, bytes]:
    from flame.protocols.paillier._math import worker_obfuscators

    try:
        request = json.loads(line)
        kind, params = request["kind"], request["params"]
        count, width = request["count"], request["width"]
        if not (
            isinstance(kind, str)
            and isinstance(params, list)
            and all(isinstance(p, int) and not isinstance(p, bool) for p in params)
            and isinstance(count, int)
            and isinstance(width, int)
            and 0 < count <= 10_000_000
            and 0 < width <= 65_536
        ):
            raise ValueError("malformed request")
        return b"OK", worker_obfuscators(kind, tuple(params), count, width)
    except Exception as exc:  # reported to the parent, which falls back to its own thread
        return b"ER", f"{type(exc).__name__}: {exc}"[:500].encode()


def serve(stdin: BinaryIO, stdout: BinaryIO) -> None:
    """Answer requests until stdin closes."""
    while True:
        line = stdin.readline(MAX_REQUEST_BYTES)
        if not line:
            return
        _reply(stdout, *_answer(line))


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(BrokenPipeError, KeyboardInterrupt):  # the parent went away
        serve(sys.stdin.buffer, sys.stdout.buffer)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
