"""A real MQTT broker for tests: Mosquitto with auth, ACL, TLS and persistence, else amqtt.

Mosquitto (when the binary exists) gets a generated config: a password file made with
`mosquitto_passwd -b`, an ACL file with per-node pattern rules (a node reads only its own inbox),
a plain listener, a TLS listener and a TLS listener that requires a client certificate (CA and
certificates generated here with `cryptography`), and persistence in a temp dir so a restart
keeps sessions and queued messages. Without Mosquitto, amqtt runs instead (MQTT 3.1.1, no ACL,
no TLS, nothing survives a restart); tests that need those skip with a reason.

Every user shares one generated token as password; `admin` may read and write everything.
The broker can be stopped (SIGTERM, or SIGKILL) and restarted on the same port. No shell,
every wait bounded.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from flame.config import BrokerSettings

__all__ = [
    "ADMIN",
    "say",
    "Broker",
    "TlsFiles",
    "free_port",
    "have_mosquitto",
    "make_tls_files",
    "mqtt_broker",
    "fresh_broker",
]

ADMIN = "admin"
DEFAULT_USERS = (
    ADMIN,
    "aggregator",
    *(f"node-{i}" for i in range(10)),
    "alice",
    "bob",
    "carol",
    "mallory",
    "sender",
    "receiver",
    "watcher",
    "crasher",
)


def _find(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for folder in ("/usr/sbin", "/usr/local/sbin", "/usr/bin"):
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


MOSQUITTO = _find("mosquitto")
MOSQUITTO_PASSWD = _find("mosquitto_passwd")


def have_mosquitto() -> bool:
    forced = os.environ.get("FLAME_TEST_BROKER", "").lower()
    if forced == "amqtt":
        return False
    return MOSQUITTO is not None and MOSQUITTO_PASSWD is not None


def say(capsys: pytest.CaptureFixture[str], text: str) -> None:
    """Print past pytest's capture: the fault tests report their counts in every CI log."""
    with capsys.disabled():
        print(f"\n  [mqtt] {text}", flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, timeout: float, process: subprocess.Popen[bytes] | None) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if process is not None and process.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.02)
    return False


@dataclass(frozen=True)
class TlsFiles:
    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls_files(directory: Path) -> TlsFiles:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost, a client certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=2)

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
        path.chmod(0o600)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flame test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(common_name: str, server: bool) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
                    ]
                ),
                critical=False,
            )
        return builder.sign(ca_key, hashes.SHA256()), key

    files = TlsFiles(
        ca_file=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
    )
    files.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    server_cert, server_key = leaf("127.0.0.1", server=True)
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    write_key(server_key, files.server_key)
    client_cert, client_key = leaf("flame-test-client", server=False)
    files.client_cert.write_bytes(client_cert.public_bytes(serialization.Encoding.PEM))
    write_key(client_key, files.client_key)
    return files


ACL = """\
# flame broker ACL: a node reads only its own inbox, writes only its own status,
# may write any inbox of its analysis and read every status; the analysis's broadcast topic
# (the aggregator's kick-offs) is open to all here, as roles are not told apart.
user {admin}
topic readwrite #

pattern read flame/+/%u/inbox
pattern write flame/+/+/inbox
pattern readwrite flame/+/%u/status
pattern read flame/+/+/status
pattern readwrite flame/+/broadcast
"""


class Broker:
    """One broker process on fixed ports; `restart()` brings it back on the same ports."""

    def __init__(
        self,
        directory: Path | None = None,
        *,
        users: Iterable[str] = DEFAULT_USERS,
        auth: bool = True,
        save_every_change: bool = False,
        kind: str | None = None,
        persistence: bool = True,
    ) -> None:
        self._own_directory = directory is None
        self.directory = (
            Path(tempfile.mkdtemp(prefix="flame-broker-")) if directory is None else directory
        )
        self.directory.mkdir(parents=True, exist_ok=True)
        self.kind = kind or ("mosquitto" if have_mosquitto() else "amqtt")
        self.host = "127.0.0.1"
        self.port = free_port()
        self.users = tuple(dict.fromkeys(users))
        self.auth = auth and self.kind == "mosquitto"
        self.password = secrets.token_urlsafe(24)
        self.save_every_change = save_every_change
        self.persistence = persistence
        self.tls_port: int | None = None
        self.mtls_port: int | None = None
        self.tls: TlsFiles | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._log = self.directory / "broker.log"
        if self.kind == "mosquitto":
            self.tls_port = free_port()
            self.mtls_port = free_port()
            self.tls = make_tls_files(self.directory / "tls")
            self._write_mosquitto_config()
        else:
            self._write_amqtt_config()

    # --- capabilities -------------------------------------------------------------------------

    @property
    def supports_acl(self) -> bool:
        return self.kind == "mosquitto" and self.auth

    @property
    def supports_tls(self) -> bool:
        return self.kind == "mosquitto"

    @property
    def persistent(self) -> bool:
        """Whether sessions and queued messages survive a restart."""
        return self.kind == "mosquitto" and self.persistence

    @property
    def queues_offline(self) -> bool:
        """Whether QoS 1 messages for a disconnected persistent session wait for it.

        amqtt 0.12 accepts clean_session=False but delivers nothing queued while away (checked
        with raw paho), so tests of that skip on it.
        """
        return self.kind == "mosquitto"

    @property
    def url(self) -> str:
        suffix = "" if self.kind == "mosquitto" else "?protocol=3.1.1"
        return f"mqtt://{self.host}:{self.port}{suffix}"

    @property
    def tls_url(self) -> str:
        assert self.tls_port is not None, "TLS needs mosquitto"
        return f"mqtts://{self.host}:{self.tls_port}"

    @property
    def mtls_url(self) -> str:
        assert self.mtls_port is not None, "TLS needs mosquitto"
        return f"mqtts://{self.host}:{self.mtls_port}"

    def settings(self, **overrides: Any) -> BrokerSettings:
        """BrokerSettings for this broker, with the shared token and short timeouts."""
        values: dict[str, Any] = {
            "url": self.url,
            "token": self.password,
            "connect_timeout": 5.0,
            "send_timeout": 10.0,
            "keepalive": 10,
        }
        values.update(overrides)
        return BrokerSettings(**values)

    def log_text(self) -> str:
        try:
            return self._log.read_text(errors="replace")
        except OSError:
            return ""

    # --- configuration ------------------------------------------------------------------------

    def _write_mosquitto_config(self) -> None:
        assert self.tls is not None and MOSQUITTO_PASSWD is not None
        data = self.directory / "data"
        data.mkdir(exist_ok=True)
        lines = [
            "per_listener_settings false",
            f"allow_anonymous {'false' if self.auth else 'true'}",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {data}/",
            "autosave_interval 1",
            f"autosave_on_changes {'true' if self.save_every_change else 'false'}",
            "max_queued_messages 0",
            "max_inflight_messages 20",
            "set_tcp_nodelay true",
            f"log_dest file {self._log}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # otherwise mosquitto drops to a user who cannot read tmp
        if self.auth:
            passwd = self.directory / "passwd"
            passwd.write_text("")
            for user in self.users:
                subprocess.run(
                    [MOSQUITTO_PASSWD, "-b", str(passwd), user, self.password],
                    check=True,
                    capture_output=True,
                    timeout=30,
                )
            acl = self.directory / "acl"
            acl.write_text(ACL.format(admin=ADMIN))
            lines += [f"password_file {passwd}", f"acl_file {acl}"]
        lines += [f"listener {self.port} {self.host}"]
        for port, require in ((self.tls_port, False), (self.mtls_port, True)):
            lines += [
                f"listener {port} {self.host}",
                f"cafile {self.tls.ca_file}",
                f"certfile {self.tls.server_cert}",
                f"keyfile {self.tls.server_key}",
                f"require_certificate {'true' if require else 'false'}",
            ]
        self._config = self.directory / "mosquitto.conf"
        self._config.write_text("\n".join(lines) + "\n")

    def _write_amqtt_config(self) -> None:
        self._config = self.directory / "amqtt.yaml"
        self._config.write_text(
            "listeners:\n"
            "  default:\n"
            "    type: tcp\n"
            f"    bind: {self.host}:{self.port}\n"
            "plugins:\n"
            "  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
            "    allow_anonymous: true\n"
        )

    # --- process ------------------------------------------------------------------------------

    def _command(self) -> list[str]:
        if self.kind == "mosquitto":
            assert MOSQUITTO is not None
            return [MOSQUITTO, "-c", str(self._config)]
        return [sys.executable, "-m", "amqtt.scripts.broker_script", "-c", str(self._config)]

    def start(self, timeout: float = 15.0) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        with self._log.open("ab") as log_file:
            self.process = subprocess.Popen(
                self._command(),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        ports = [p for p in (self.port, self.tls_port, self.mtls_port) if p is not None]
        for port in ports:
            if not _wait_port(port, timeout, self.process):
                self.stop(kill=True)
                raise RuntimeError(
                    f"{self.kind} did not start on port {port}; log:\n{self.log_text()[-3000:]}"
                )

    def stop(self, *, kill: bool = False, timeout: float = 10.0) -> None:
        """Stop the broker: SIGTERM (it saves its state) or SIGKILL (it saves nothing more)."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        self.process = None

    def restart(self, *, kill: bool = False, down_for: float = 0.0) -> None:
        self.stop(kill=kill)
        if down_for:
            time.sleep(down_for)
        self.start()
        self.restarts += 1

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def close(self) -> None:
        self.stop()
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Broker:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@pytest.fixture(scope="session")
def mqtt_broker() -> Iterator[Broker]:
    """One broker for the whole test session. Tests must not stop it; use `fresh_broker`."""
    with Broker() as broker:
        yield broker


@pytest.fixture
def fresh_broker() -> Iterator[Broker]:
    """A broker of this test's own, which it may stop, kill and restart."""
    with Broker() as broker:
        yield broker
