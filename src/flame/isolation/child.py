"""The analysis child: load the analyst's functions, run `analyze` on request, reply.

Everything it needs from the node (files, other data sources, messages to other nodes,
node-local state, progress) it asks the parent for over the channel. It holds no key, no
token and no broker connection; its environment was scrubbed by the parent.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import socket
import sys
from pathlib import Path
from types import ModuleType
from typing import IO, Any

from flame.isolation.channel import Channel, ChannelClosed

CHILD_ENV = "FLAME_ANALYSIS_CHILD"
_FLAME_DIR = str(Path(__file__).resolve().parent.parent)
_TRACEBACK_LIMIT = 16 * 1024


class RemoteError(Exception):
    """The parent refused or failed a request of the analysis (message from the parent)."""


class _Rpc:
    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    def call(self, op: str, **args: Any) -> Any:
        from flame.privacy.markers import to_plain

        self.channel.send("call", {"op": op, "args": to_plain(args)})
        kind, body = self.channel.receive()
        if kind != "reply" or not isinstance(body, dict):
            raise RemoteError(f"unexpected answer {kind!r} from the node runtime")
        if "error" in body:
            import flame.errors

            e = flame.errors
            same = {
                c.__name__: c
                for c in (e.DataError, e.FlameError, e.PolicyRefused, e.TransportError)
            }
            error_type = same.get(str(body.get("type")))
            if error_type is not None:
                raise error_type(str(body["error"]))  # as the analysis would see it in-process
            raise RemoteError(f"{body.get('type')}: {body['error']}")
        return body.get("value")

    def descriptor(self, source: str, name: str) -> int:
        """A read-only descriptor of a node-folder file, opened and passed by the parent."""
        self.call("open", source=source, name=name)
        passed, self.channel.passed = self.channel.passed, []
        if len(passed) != 1:
            for fd in passed:
                os.close(fd)
            raise RemoteError("the node runtime sent no file descriptor")
        return passed[0]


class RemoteFileSource:
    """A file source of the node, read through the parent (which counts the rows read)."""

    def __init__(self, name: str, rpc: _Rpc) -> None:
        self.name = name
        self._rpc = rpc

    def files(self) -> list[str]:
        return list(self._rpc.call("files", source=self.name))

    def open(self, name: str) -> IO[bytes]:
        import io

        return io.BytesIO(self._rpc.call("read", source=self.name, name=name))


class RemoteSource:
    """Another kind of source (FHIR, ...): its public methods are called in the parent."""

    def __init__(self, name: str, rpc: _Rpc) -> None:
        self.name = name
        self._rpc = rpc

    def __getattr__(self, method: str) -> Any:
        if method.startswith("_"):
            raise AttributeError(method)

        def call(*args: Any, **kwargs: Any) -> Any:
            value = self._rpc.call(
                "source_call", source=self.name, method=method, args=list(args), kwargs=kwargs
            )
            if method == "table" and isinstance(value, dict):
                import numpy as np

                value = {k: np.asarray(v) for k, v in value.items()}
            return value

        return call


def _descriptor_source(name: str, rpc: _Rpc) -> Any:
    from flame.data.sources.descriptor import DescriptorSource

    return DescriptorSource(
        name,
        lambda: list(rpc.call("files", source=name)),
        lambda file_name: rpc.descriptor(name, file_name),
    )


def _import_by_file(name: str, file: str) -> ModuleType:
    folder = str(Path(file).resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {file}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _locate(locator: dict[str, Any]) -> Any:
    if "path" in locator:  # a .py file or a folder, found as `flame simulate/run` find it
        from flame.analysis.loader import load_analysis, source_only_imports

        if locator.get("root"):  # the node's snapshot of the reviewed files: source only
            source_only_imports(str(locator["root"]))
        return load_analysis(str(locator["path"])).functions.analyze
    module_name, file, qualname = locator["module"], locator.get("file"), locator["qualname"]
    module: ModuleType | None = None
    if module_name != "__main__":
        module = sys.modules.get(module_name)
        if module is None:
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                module = None
        module_file = getattr(module, "__file__", None) if module is not None else None
        if file and module_file and Path(module_file).resolve() != Path(file).resolve():
            module = None
    if module is None:
        if not file:
            raise ImportError(f"cannot find the module {module_name!r} of {qualname}")
        name = "__flame_main__" if module_name == "__main__" else module_name
        module = sys.modules.get(name) or _import_by_file(name, file)
    target: Any = module
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def _analysis_traceback(exc: BaseException) -> str:
    """The analysis frames only (flame.privacy.tracebacks, shared with in-process runs); the node
    runtime masks secrets and applies its policy before anything leaves the node."""
    from flame.privacy.tracebacks import analysis_traceback

    return analysis_traceback(exc, limit=_TRACEBACK_LIMIT)


def _failure(exc: BaseException) -> dict[str, Any]:
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": _analysis_traceback(exc),
    }


class _Child:
    def __init__(self, channel: Channel, network: str, confinement: str = "none") -> None:
        self.channel = channel
        self.rpc = _Rpc(channel)
        self.network = network
        self.confinement = confinement
        self.analyze: Any = None
        self.context: Any = None
        self.data: Any = None

    def load(self, body: dict[str, Any]) -> dict[str, Any]:
        from flame.analysis.functions import AnalysisFunctions
        from flame.data import Data

        sys.path[:0] = [p for p in body.get("sys_path", []) if p not in sys.path]
        function = _locate(body["analyze"])
        self.analyze = AnalysisFunctions.of(function, lambda results: None).analyze
        sources: dict[str, object] = {}
        for name, kind in body.get("sources", {}).items():
            if kind == "local":
                sources[name] = _descriptor_source(name, self.rpc)
                continue
            sources[name] = (
                RemoteFileSource(name, self.rpc)
                if kind == "files"
                else RemoteSource(name, self.rpc)
            )
        self.data = Data(sources, node_id=body.get("node_id", ""))
        self.context = _child_context(body, self.rpc)
        declared = getattr(getattr(function, "__wrapped__", function), "__flame_spend__", None)
        return {
            "network": self.network,
            "confinement": self.confinement,
            "pid": os.getpid(),
            "declared": declared,
        }

    def run(self, body: dict[str, Any]) -> Any:
        from flame.node.context import active
        from flame.privacy.markers import to_plain

        self.context.epoch = int(body["epoch"])
        self.context._progress = 0.0
        with active(self.context):
            result = self.analyze(self.data, epoch=self.context.epoch, previous=body["previous"])
        return to_plain(result)

    def serve(self) -> int:
        while True:
            try:
                op, body = self.channel.receive()
            except ChannelClosed:
                return 0
            if op == "stop":
                return 0
            try:
                if op == "load":
                    self.channel.send("ready", self.load(body))
                elif op == "analyze":
                    self.channel.send("result", {"value": self.run(body)})
                else:
                    self.channel.send("failure", _failure(ValueError(f"unknown op {op!r}")))
            except (ChannelClosed, BrokenPipeError):
                return 0
            except BaseException as exc:  # reported to the parent, which fails the epoch
                try:
                    self.channel.send("failure", _failure(exc))
                except TypeError as encode_error:  # an unsendable result
                    self.channel.send("failure", _failure(encode_error))
                if isinstance(exc, KeyboardInterrupt):
                    return 130


def _child_context(body: dict[str, Any], rpc: _Rpc) -> Any:
    from flame.node.context import Context, Received

    class ChildContext(Context):
        """`flame.context()` inside the child: messages, state and progress via the parent."""

        def send(
            self, category: str, body: Any, *, to: Any = None, timeout: float = 30.0
        ) -> set[str]:
            to = None if to is None else list(to)
            acked = rpc.call("send", category=category, body=body, to=to, timeout=timeout)
            return set(acked)

        def receive(self, category: str, *, senders: Any = None, timeout: float = 30.0) -> Received:
            senders = None if senders is None else list(senders)
            got = rpc.call("receive", category=category, senders=senders, timeout=timeout)
            return Received(dict(got["messages"]), list(got["missing"]))

        def set_progress(self, fraction: float) -> None:
            value = min(max(float(fraction), 0.0), 1.0)
            if value > self._progress:
                self._progress = value
                rpc.call("progress", fraction=value)

        def save(self, tag: str, value: Any) -> None:
            rpc.call("save", tag=tag, value=value)

        def load(self, tag: str, default: Any = None) -> Any:
            found = rpc.call("load", tag=tag)
            return default if not found["present"] else found["value"]

    context = ChildContext(
        analysis_id=body["analysis_id"],
        node_id=body["node_id"],
        role="analysis",
        participants=list(body["participants"]),
        aggregator_id=body["aggregator_id"],
        mailbox=None,  # type: ignore[arg-type]
        seed=body.get("seed"),
    )
    params = body.get("params")
    context.params = dict(params) if isinstance(params, dict) else {}
    return context


def refuse_nested_run(what: str) -> None:
    """A node or simulation started from inside an analysis child (an unguarded script)."""
    if os.environ.get(CHILD_ENV) == "1":
        from flame.errors import FlameError

        raise FlameError(
            f"{what} called while the analysis is being loaded in its child process; "
            'put it under `if __name__ == "__main__":`'
        )


def main(fd: int, network: str = "unknown", confinement: str = "none") -> int:
    """Serve the parent on the inherited socket `fd` until it says stop or goes away."""
    os.environ[CHILD_ENV] = "1"
    sock = socket.socket(fileno=fd)
    return _Child(Channel(sock, accept_descriptors=True), network, confinement).serve()
