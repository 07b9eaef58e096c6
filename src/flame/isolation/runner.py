"""How a node runs `analyze`: in this process, or in an isolated child (the default on nodes).

Both runners return an `Outcome`: the result (markers still in place, for the policy) and the
rows the epoch read, counted here in the runtime from what the data handle served. The
child's answer is checked by the caller exactly like an in-process result.

The child's sandbox is an allow-list (`_landlock`): it reads Python, site-packages, flame and
the analysis code (`child_readable`; on `flame run` a read-only snapshot of the hashed files),
writes one scratch folder removed when it ends, and gets node files only as descriptors the
runtime opened after `resolve_node_file`'s check. The runtime imports what it would import
lazily (`preload_runtime`) before the child is given any analysis code to run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flame.data import Data, FileSource, LocalSource
from flame.data.sources.descriptor import open_read_only, reachable
from flame.errors import AnalysisError, FlameError, PolicyRefused, RunTimeout
from flame.isolation.channel import Channel, ChannelClosed
from flame.isolation.inprocess import InProcessRunner, Outcome, RowMeter, Runner
from flame.isolation.locate import AnalysisAt, locate, not_isolable
from flame.isolation.output import relay_output
from flame.isolation.reach import child_hidden_paths, child_readable, settings_paths
from flame.isolation.spawn import (
    ChildProcess,
    empty_scratch,
    scrubbed_environment,
    spawn_child,
    take_warm,
)
from flame.node.context import Context
from flame.privacy.markers import from_plain, to_plain
from flame.utils.deadline import call_deadline
from flame.utils.logs import mask_credentials
from flame.wire.envelope import DEFAULT_MAX_BYTES

__all__ = [
    "AnalysisAt",
    "ChildRunner",
    "InProcessRunner",
    "Outcome",
    "Runner",
    "RowMeter",
    "locate",
    "not_isolable",
    "scrubbed_environment",
    "settings_paths",
]

log = logging.getLogger(__name__)

_STOP_TIMEOUT = 5.0
MAX_CHILD_ITEMS = 1_000_000
"""JSON values in one frame from the child (arrays travel as raw bytes and do not count)."""
_SLICE = 1.0  # s: how often a wait served for the child looks for an abort


RUNTIME_MODULES = (
    "flame.data.csv_columns",
    "flame.data.readers",
    "flame.data.sources.descriptor",
    "flame.data.sources.local",
    "flame.privacy.release",
    "flame.privacy.policy",
    "flame.privacy.tracebacks",
    "flame.wire.envelope",
    "flame.wire.tables",
    "pyarrow",
    "pyarrow.csv",
    "pyarrow.parquet",
)
"""What the runtime may import lazily while or after a child runs (flame.dp statistics read
the node's CSV data; results are decoded and checked)."""
_preloaded = False


def preload_runtime() -> None:
    """Import `RUNTIME_MODULES` now, before any analysis child exists: a module imported
    later could have been planted by the child if its files were writable (the child's
    domain forbids that; `flame check` fails when the node user could write them)."""
    global _preloaded
    if _preloaded:
        return
    import importlib

    for name in RUNTIME_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # an optional dependency (pyarrow) that is not installed
            log.debug("not preloaded (not installed): %s", name)
    _preloaded = True


def _kill_group(process: ChildProcess) -> None:
    """Kill the child's process group (it leads a session of its own) while its leader is
    not yet reaped, so the group id cannot belong to anyone else. Where the child runs as
    PID 1 of its own PID namespace (`_boot`), ending it ends every process it started; this
    is the fallback where that namespace is not available (a process that left the group
    with setsid() is then out of reach)."""
    if not isinstance(process, subprocess.Popen):
        return  # a fork server's child: its pid is of the server's namespace, not ours
    with contextlib.suppress(OSError):
        os.killpg(process.pid, signal.SIGKILL)


class ChildRunner:
    """`analyze` in a child process with a scrubbed environment, no keys and no broker."""

    def __init__(
        self,
        analyze: Callable[..., Any],
        data: Data,
        context: Context,
        *,
        timeout: float = 3600.0,
        cut_network: bool = True,
        capture_output: bool = False,
        hide: Sequence[str | Path] = (),
        allow_messages: bool = True,
        max_frame_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        locator = locate(analyze)
        if locator is None:
            raise FlameError(not_isolable(analyze))
        self.locator = locator
        self.data = data
        self.context = context
        self.timeout = timeout
        self.cut_network = cut_network
        self.capture_output = capture_output  # forward_logs: no warm child (see start)
        # Called about once a second while the child computes; what it raises ends the wait
        # (the node runtime uses it to stop at an abort or a finished run).
        self.on_wait: Callable[[], None] | None = None
        self.hide = child_hidden_paths(hide, locator.get("file") or locator.get("path"))
        self.readable = child_readable(locator)
        self.allow_messages = allow_messages
        self.max_frame_bytes = max_frame_bytes  # the broker's message limit on a node
        self.meter = RowMeter()
        self.network = "not started"
        self.confinement = "not started"
        self._declared: Any = None
        self._deadline = float("inf")
        self._stopping: BaseException | None = None
        self._process: ChildProcess | None = None
        self._channel: Channel | None = None

    @property
    def declared_spend(self) -> Any:
        return self._declared

    @property
    def rows_read(self) -> int:
        """Rows served to `analyze` so far in this epoch (what a message is checked against)."""
        return self.meter.rows

    # --- life cycle --------------------------------------------------------------------------
    def start(self) -> None:
        if self._process is not None:
            return
        self._declared = None
        self._process, ours = self._obtain()
        # what a child sends is capped like a broker message, and in JSON values: a small
        # frame must not decode into gigabytes of Python objects here
        self._channel = Channel(ours, max_bytes=self.max_frame_bytes, max_items=MAX_CHILD_ITEMS)
        if self.hide:  # a node's runtime (next to keys and tokens); not the analyst's own
            # while the child boots, and before it is sent any analysis code to run: nothing
            # the runtime imports later can have been planted by the analysis
            preload_runtime()
        sources = {  # a node folder is read by the child through descriptors (streamed)
            name: "local"
            if isinstance(source, LocalSource)
            else "files"
            if isinstance(source, FileSource)
            else "other"
            for name, source in self.data.sources.items()
        }
        ctx = self.context
        try:
            ready = self._load(sources, ctx)
        except BaseException:
            # Interrupted or failed while loading: a child left running here would be taken
            # for a loaded one by the next start() and sent a run it cannot serve.
            self.close()
            raise
        self.network = str(ready.get("network", "unknown"))
        self.confinement = str(ready.get("confinement", "unknown"))
        self._declared = ready.get("declared")
        level = logging.DEBUG if self.network == "cut" else logging.INFO
        if self.confinement.startswith("no confinement"):
            level = logging.ERROR  # `flame check` fails on this too (check_install)
        log.log(
            level,
            "analysis child %s started; network %s; %s",
            ready.get("pid"),
            self.network,
            self.confinement,
        )

    def _obtain(self) -> tuple[ChildProcess, socket.socket]:
        """A child process for this runner and our end of its socket."""
        # a child started early by `prestart` (flame simulate) if one waits, else a new one
        # (warm children know no paths to hide: they serve runs that hide nothing)
        warm = (
            None if self.capture_output or self.hide else take_warm(self.cut_network, self.readable)
        )
        process, ours = warm or spawn_child(
            self.cut_network, self.capture_output, hide=self.hide, read=self.readable
        )
        # never the node's own terminal or log descriptors: pipes, relayed as log lines
        relay_output(process, self.context.node_id or "")
        return process, ours

    def _load(self, sources: dict[str, str], ctx: Context) -> dict[str, Any]:
        return self._request(
            "load", self._load_body(sources, ctx), "ready", deadline=time.monotonic() + 120.0
        )

    def _load_body(self, sources: dict[str, str], ctx: Context) -> dict[str, Any]:
        return {
            "analyze": self.locator,
            "sys_path": [p for p in sys.path if p and Path(p).is_dir()]
            if "path" not in self.locator
            else [],
            "sources": sources,
            "node_id": ctx.node_id,
            "analysis_id": ctx.analysis_id,
            "aggregator_id": ctx.aggregator_id,
            "participants": ctx.participants,
            "seed": ctx._seed,
            "params": ctx.params,
        }

    def run(self, epoch: int, previous: Any) -> Outcome:
        self.start()
        self.meter.reset()
        body = self._request(
            "analyze",
            {"epoch": epoch, "previous": previous},
            "result",
            deadline=time.monotonic() + self.timeout,
        )
        return self._outcome(body)

    def _outcome(self, body: dict[str, Any]) -> Outcome:
        try:
            result = from_plain(body["value"])
        except ValueError as exc:
            raise AnalysisError(
                "ValueError", f"malformed result from the analysis: {exc}"
            ) from None
        return Outcome(result, self.meter.rows, {"network": self.network})

    def close(self) -> None:
        process, channel = self._process, self._channel
        self._process = self._channel = None
        if channel is not None:
            with contextlib.suppress(OSError):
                channel.send("stop")
            channel.close()
        if process is not None:
            try:
                process.wait(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                _kill_group(process)
                process.kill()
                process.wait(timeout=_STOP_TIMEOUT)
            empty_scratch(process)  # nothing the child wrote outlives its run

    # --- the conversation --------------------------------------------------------------------
    def _request(self, op: str, body: Any, answer: str, *, deadline: float) -> dict[str, Any]:
        self._post(op, body, deadline=deadline)
        return self._answer(answer, deadline)

    def _post(self, op: str, body: Any, *, deadline: float) -> None:
        assert self._channel is not None
        self._deadline = deadline  # what the child's own waits are capped at (`_wait_for`)
        self._channel.send(op, body)

    def _answer(self, answer: str, deadline: float) -> dict[str, Any]:
        """Serve the child's calls until its `answer` (or a failure) comes."""
        for kind, reply in self._messages(deadline):
            if kind == "call":
                self._serve(reply)
            elif kind == answer and isinstance(reply, dict):
                return reply
            elif kind == "failure" and isinstance(reply, dict):
                raise AnalysisError(
                    str(reply.get("type", "Exception")),
                    str(reply.get("message", "")),
                    str(reply.get("traceback", "")),
                )
            else:
                self._abandon()
                raise AnalysisError("ProtocolError", f"unexpected {kind!r} from the analysis")
        raise AssertionError("unreachable")

    def _messages(self, deadline: float) -> Iterator[tuple[str, Any]]:
        assert self._channel is not None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self._abandon()
                raise RunTimeout("analyze did not finish within its deadline; child stopped")
            try:
                yield self._channel.receive(timeout=min(left, 1.0))
            except TimeoutError:
                if self._process is not None and self._process.poll() is not None:
                    code = self._process.returncode
                    self._abandon()
                    raise AnalysisError(
                        "ProcessExit", f"the analysis process exited with code {code}"
                    ) from None
                if self.on_wait is not None:
                    self.on_wait()
            except (ChannelClosed, ConnectionError) as exc:
                code = None if self._process is None else self._process.wait(timeout=5.0)
                self._abandon()
                raise AnalysisError(
                    "ProcessExit", f"the analysis process exited with code {code}"
                ) from exc

    def _abandon(self) -> None:
        process, channel = self._process, self._channel
        self._process = self._channel = None
        if process is not None and process.poll() is None:
            _kill_group(process)
            process.kill()
            process.wait(timeout=_STOP_TIMEOUT)
        if process is not None:
            empty_scratch(process)
        if channel is not None:
            channel.close()

    def _serve(self, call: Any) -> None:
        """One call of the child, served within what is left of its deadline (a data source
        call too: `call_deadline`). The reply's error text has credentials masked; an
        unforeseen exception (a source's RecursionError, say) is named by its type only."""
        assert self._channel is not None
        try:
            if not isinstance(call, dict) or not isinstance(call.get("args"), dict):
                raise FlameError("malformed request")
            with call_deadline(self._deadline):
                if call.get("op") == "open":
                    self._send_descriptor(from_plain(call["args"]))
                    return
                value = self._dispatch(str(call.get("op")), from_plain(call["args"]))
            reply: dict[str, Any] = {"value": to_plain(value)}
        except (FlameError, OSError, TypeError, ValueError, KeyError) as exc:
            text = mask_credentials(" ".join(str(exc).split()))
            reply = {"error": text[:500], "type": type(exc).__name__}
        except Exception as exc:
            if exc is self._stopping:  # on_wait's abort: it ends the wait, not the call
                raise
            name = type(exc).__name__
            reply = {"error": f"the node failed serving this request ({name})", "type": name}
        self._channel.send("reply", reply)

    def _send_descriptor(self, args: dict[str, Any]) -> None:
        """A file of a node folder, opened read-only here and passed to the child, which
        streams it itself (no copy through the channel); its rows are counted here."""
        from flame.data.sources.descriptor import count_records

        assert self._channel is not None
        name, source_name = str(args["name"]), str(args["source"])
        source = self.data.source(source_name)
        if not isinstance(source, LocalSource):
            raise FlameError(f"data source {source_name!r} is not a node folder")
        fd = open_read_only(source.root, name, self.hide)
        try:
            self.meter.descriptor(source_name, name, fd, count_records)
            self._channel.send("reply", {"value": True}, descriptors=[fd])
        finally:
            os.close(fd)

    def _dispatch(self, op: str, args: dict[str, Any]) -> Any:
        ctx = self.context
        if op == "files":
            source = self.data.source(str(args["source"]))
            if not isinstance(source, FileSource):
                raise FlameError("not a file source")
            if isinstance(source, LocalSource):  # names leading into a hidden path: unlisted
                return [n for n in source.files() if reachable(source.root, n, self.hide)]
            return source.files()
        if op == "read":
            name, source_name = str(args["name"]), str(args["source"])
            source = self.data.source(source_name)
            if isinstance(source, LocalSource):  # the same path check as "open"
                with os.fdopen(open_read_only(source.root, name, self.hide), "rb") as stream:
                    content = stream.read()
            else:
                content = self.data.read_bytes(name, source=source_name)
            self.meter.file(source_name, name, content)
            return content
        if op == "source_call":
            return self._source_call(args)
        if op == "progress":
            ctx.set_progress(float(args["fraction"]))
            return None
        if op == "send":
            if not self.allow_messages and ctx.outgoing is None:  # else the node's gate checks
                raise PolicyRefused(
                    "this node's policy does not let analyze send messages (rule: allow_messages)"
                )
            to = args.get("to")
            return sorted(
                ctx.send(
                    str(args["category"]),
                    args.get("body"),
                    to=to,
                    timeout=self._wait_for(args),
                )
            )
        if op == "receive":
            return self._receive(str(args["category"]), args.get("senders"), args)
        if op == "save":
            ctx.save(str(args["tag"]), args.get("value"))
            return None
        if op == "load":
            missing = object()
            value = ctx.load(str(args["tag"]), missing)
            return {"present": value is not missing, "value": None if value is missing else value}
        raise FlameError(f"unknown request {op[:40]!r}")

    def _wait_for(self, args: dict[str, Any]) -> float:
        """The child's requested wait, capped at what is left of the epoch: a request
        must not hold the runtime past its deadline."""
        try:
            asked = float(args.get("timeout", 30.0))
        except (TypeError, ValueError):
            raise FlameError("timeout must be a number") from None
        if asked != asked:  # NaN
            raise FlameError("timeout must be a number")
        return max(0.0, min(asked, self._deadline - time.monotonic()))

    def _receive(self, category: str, senders: Any, args: dict[str, Any]) -> dict[str, Any]:
        """`Context.receive` in slices of at most a second, watching for an abort (or the
        end of the run) between them like a computing child (`on_wait`)."""
        end = time.monotonic() + self._wait_for(args)
        wanted = None if senders is None else [str(s) for s in senders]
        messages: dict[str, Any] = {}
        while True:
            left = max(0.0, end - time.monotonic())
            got = self.context.receive(category, senders=wanted, timeout=min(left, _SLICE))
            messages.update(got.messages)
            wanted = list(got.missing)
            if not wanted or left <= _SLICE:
                return {"messages": messages, "missing": sorted(wanted)}
            self._watch()

    def _watch(self) -> None:
        """`on_wait` during a call of the child; what it raises (an abort, the end of the
        run) ends the call and is passed on by `_serve`, not replied to the child."""
        if self.on_wait is None:
            return
        try:
            self.on_wait()
        except Exception as exc:
            self._stopping = exc
            raise

    def _source_call(self, args: dict[str, Any]) -> Any:
        source = self.data.source(str(args["source"]))
        method = str(args["method"])
        allowed = getattr(source, "remote_methods", ())
        if method not in allowed:
            raise FlameError(f"data source {args['source']!r} does not offer {method!r}")
        value = getattr(source, method)(*args.get("args", []), **args.get("kwargs", {}))
        if isinstance(value, Iterator):
            value = list(value)
        if isinstance(value, dict):
            value = {
                k: v.tolist() if isinstance(v, np.ndarray) and v.dtype.kind in "US" else v
                for k, v in value.items()
            }
        self.meter.records(value)
        return value
