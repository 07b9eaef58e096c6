"""A TCP proxy on loopback that can refuse connections for a while, or black-hole them.

The S3 test server loses its data when restarted, so an outage is staged in front of it:
`refuse_for(20)` closes the listening socket (connects are refused) and cuts every open
connection; after 20 s the same port listens again and traffic flows to the server as before.

`black_hole_for(6)` is a network partition: no byte and no close passes either way, new
connections are accepted but not connected onwards, and nobody is told (no RST, no FIN), as
when a link drops packets; afterwards what was held flows on, as TCP's retransmissions would
deliver it, unless an end gave up meanwhile (its close then passes too).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

__all__ = ["TcpProxy"]


class TcpProxy:
    """Forwards 127.0.0.1:`port` to `target_host`:`target_port`, one thread pair per link."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = self._listen(0)
        self.port = int(self._listener.getsockname()[1])
        self._links: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._accepting = threading.Thread(target=self._accept_loop, daemon=True)
        self._accepting.start()
        self.refused_until = 0.0
        self._flowing = threading.Event()  # cleared during a black hole
        self._flowing.set()
        self.uplink_rate: float | None = None  # bytes/s from clients to the target, if limited

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _listen(self, port: int) -> socket.socket:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(64)
        listener.settimeout(0.2)
        return listener

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            with self._lock:
                listener = self._listener
            if listener is None:
                time.sleep(0.05)
                continue
            try:
                client, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._link, args=(client,), daemon=True).start()

    def _link(self, client: socket.socket) -> None:
        self._flowing.wait()  # in a black hole the connect goes nowhere (yet)
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        with self._lock:
            self._links.update((client, upstream))
        for source, sink, up in ((client, upstream, True), (upstream, client, False)):
            threading.Thread(target=self._pump, args=(source, sink, up), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, up: bool = False) -> None:
        try:
            while True:
                rate = self.uplink_rate if up else None
                data = source.recv(4096 if rate else 65536)
                self._flowing.wait()  # a black hole holds every byte, and every close
                if not data:
                    break
                if rate:
                    time.sleep(len(data) / rate)  # a slow uplink: the bytes trickle through
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            with self._lock:
                self._links.discard(source)
                self._links.discard(sink)

    def refuse_for(self, seconds: float) -> None:
        """From now on connections are refused (and open ones cut) for `seconds`; returns at
        once, the port listens again by itself."""
        with self._lock:
            listener, self._listener = self._listener, None
            links, self._links = set(self._links), set()
        if listener is not None:
            listener.close()
        for sock in links:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self.refused_until = time.monotonic() + seconds

        def reopen() -> None:
            if not self._stopped.wait(seconds):
                reopened = self._listen(self.port)
                with self._lock:
                    self._listener = reopened

        threading.Thread(target=reopen, daemon=True).start()

    def black_hole_for(self, seconds: float) -> None:
        """A partition from now on, for `seconds` (returns at once; it ends by itself)."""
        self._flowing.clear()
        self.refused_until = time.monotonic() + seconds

        def restore() -> None:
            self._stopped.wait(seconds)
            self._flowing.set()

        threading.Thread(target=restore, daemon=True).start()

    def close(self) -> None:
        self._stopped.set()
        self._flowing.set()
        with self._lock:
            listener, self._listener = self._listener, None
            links, self._links = set(self._links), set()
        if listener is not None:
            listener.close()
        for sock in links:
            with contextlib.suppress(OSError):
                sock.close()
        self._accepting.join(5)

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
