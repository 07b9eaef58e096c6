"""A throwaway local MQTT broker for `flame simulate --broker embedded`.

It lets a user try the real transport on a laptop: Mosquitto when its binary is installed,
else the pure-Python amqtt broker (`pip install amqtt`). Loopback only, anonymous, no
persistence; it dies with the simulation.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from flame.errors import TransportError

__all__ = ["EmbeddedBroker"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class EmbeddedBroker:
    """`with EmbeddedBroker() as url:` runs a broker on 127.0.0.1 for the block's duration."""

    def __init__(self, startup_timeout: float = 15.0) -> None:
        self.startup_timeout = startup_timeout
        self.port = _free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="flame-broker-")
        self._process: subprocess.Popen[bytes] | None = None
        self._amqtt = False

    @property
    def url(self) -> str:
        suffix = "?protocol=3.1.1" if self._amqtt else ""  # amqtt does not speak MQTT 5
        return f"mqtt://127.0.0.1:{self.port}{suffix}"

    def _command(self) -> list[str]:
        folder = Path(self._dir.name)
        mosquitto = shutil.which("mosquitto") or (
            "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
        )
        if mosquitto is not None:
            config = folder / "mosquitto.conf"
            config.write_text(
                f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                "max_queued_messages 100000\n"
            )
            return [mosquitto, "-c", str(config)]
        try:
            import amqtt  # noqa: F401
        except ImportError:
            raise TransportError(
                "--broker embedded needs the mosquitto binary or the amqtt package "
                "(pip install amqtt)"
            ) from None
        self._amqtt = True
        config = folder / "amqtt.yaml"
        config.write_text(
            "listeners:\n  default:\n    type: tcp\n"
            f"    bind: 127.0.0.1:{self.port}\n"
            "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
            "    allow_anonymous: true\n"
        )
        return [sys.executable, "-m", "amqtt.scripts.broker_script", "-c", str(config)]

    def start(self) -> str:
        self._process = subprocess.Popen(  # noqa: S603 - fixed argument list, no shell
            self._command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self.url
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TransportError(f"the embedded broker did not start on port {self.port}")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=5)
        self._process = None
        self._dir.cleanup()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
