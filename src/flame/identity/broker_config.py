"""Mosquitto set-up from the roster: password file, ACL, and the settings flame relies on.

`flame broker config --roster R --out DIR` writes
* `DIR/tokens/NODE.token` (0600): a random broker password per member, to mount on that node
  as FLAME_BROKER__TOKEN_FILE (the broker user name is the node id);
* `DIR/passwd`: Mosquitto's password file for those tokens (`mosquitto_passwd` when it is
  installed, else the same PBKDF2-SHA512 `$7$` format written here);
* `DIR/acl`: per member, read its own inbox only, write any inbox and its own status, read
  every status (what `flame status` and the aggregator's presence need); the aggregation
  member writes, analysis members read, the analysis's broadcast topic (kick-offs, sent once);
* `DIR/mosquitto.conf`: a snippet with those files, no anonymous access and the persistence
  settings the README recommends (no message lost when the broker is killed).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from flame.errors import ConfigError
from flame.identity.roster import Roster

__all__ = ["BrokerFiles", "password_line", "write_broker_config"]

log = logging.getLogger(__name__)

_ITERATIONS = 101  # mosquitto_passwd's own default; the passwords are random 192-bit tokens
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


@dataclass(frozen=True)
class BrokerFiles:
    passwd: Path
    acl: Path
    config: Path
    tokens: dict[str, Path]
    tool: str  # "mosquitto_passwd" or "flame" (who hashed the passwords)


def password_line(user: str, password: str, salt: bytes | None = None) -> str:
    """One Mosquitto password-file line: `user:$7$101$<salt b64>$<PBKDF2-SHA512 b64>`."""
    salt = salt if salt is not None else os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _ITERATIONS)
    return (
        f"{user}:$7${_ITERATIONS}${base64.b64encode(salt).decode()}"
        f"${base64.b64encode(digest).decode()}"
    )


def _acl(roster: Roster, analysis: str, operators: list[str]) -> str:
    lines = [
        f"# flame ACL for the roster with SHA-256 {roster.fingerprint}",
        "# Each block applies to one broker user (= node id). There are no lines before the",
        "# first `user` line on purpose: such lines would apply to anonymous clients only.",
        "# Every member reads every status, so no status carries node log lines: the",
        "# aggregator keeps forwarded logs in its storage (`flame status --logs`).",
    ]
    for member in roster:
        node = member.node_id
        broadcasts = "write" if member.role == "aggregation" else "read"
        lines += [
            "",
            f"user {node}",
            f"topic read flame/{analysis}/{node}/inbox",
            f"topic write flame/{analysis}/+/inbox",
            f"topic readwrite flame/{analysis}/{node}/status",
            f"topic read flame/{analysis}/+/status",
            f"topic {broadcasts} flame/{analysis}/broadcast",
        ]
    for operator in operators:
        lines += ["", f"user {operator}", f"topic read flame/{analysis}/+/status"]
    return "\n".join(lines) + "\n"


def _conf(passwd: Path, acl: Path, roster: Roster, persistence: Path) -> str:
    return "\n".join(
        [
            f"# flame: Mosquitto settings for the roster with SHA-256 {roster.fingerprint}",
            "# Include from mosquitto.conf, or append; add a TLS listener for production:",
            "#   listener 8883",
            "#   cafile /etc/mosquitto/ca.crt",
            "#   certfile /etc/mosquitto/server.crt",
            "#   keyfile /etc/mosquitto/server.key",
            "per_listener_settings false",
            "allow_anonymous false",
            f"password_file {passwd.resolve()}",
            f"acl_file {acl.resolve()}",
            "# persistence: queued messages and sessions survive a restart or a kill",
            "persistence true",
            f"persistence_location {str(persistence).rstrip('/')}/",
            "autosave_on_changes true",
            "autosave_interval 1",
            "# never drop queued QoS 1 messages (the default of 1000 can, with many nodes)",
            "max_queued_messages 0",
            "",
        ]
    )


def write_broker_config(
    roster: Roster,
    out: Path,
    *,
    analysis: str = "+",
    operators: tuple[str, ...] = (),
    use_tool: bool | None = None,
    persistence: Path = Path("/var/lib/mosquitto"),
) -> BrokerFiles:
    """Write the files to `out` (a new or empty folder); see the module docstring.

    `analysis` scopes every rule to one analysis id ('+': any). `operators` are extra users
    who may only read statuses (for `flame status`). `use_tool=False` hashes in Python even
    when `mosquitto_passwd` exists (None: use it if found). `persistence` is the folder
    where Mosquitto keeps sessions and queued messages (it must be writable by the broker)."""
    for name in [analysis, *operators]:
        if name != "+" and not _NAME.match(name):
            raise ConfigError(f"broker config: {name!r} is not a valid id")
    clash = [o for o in operators if o in roster]
    if clash:
        raise ConfigError(f"broker config: operator {clash[0]!r} is also a roster member")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"broker config: {out} is not empty; refusing to overwrite")
    tokens_dir = out / "tokens"
    tokens_dir.mkdir(parents=True, exist_ok=True)
    users = [m.node_id for m in roster] + list(operators)
    passwords = {user: secrets.token_urlsafe(24) for user in users}
    tokens: dict[str, Path] = {}
    for user, password in passwords.items():
        path = tokens_dir / f"{user}.token"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(password + "\n")
        tokens[user] = path
    passwd = out / "passwd"
    tool = shutil.which("mosquitto_passwd") if use_tool is not False else None
    fd = os.open(passwd, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        if tool is not None:  # plain `user:token` lines, hashed in place by -U (no argv secrets)
            handle.write("".join(f"{u}:{p}\n" for u, p in passwords.items()))
        else:
            handle.write("".join(password_line(u, p) + "\n" for u, p in passwords.items()))
    if tool is not None:
        done = subprocess.run(  # noqa: S603 - fixed argument list, no shell
            [tool, "-U", str(passwd)], capture_output=True, timeout=30, check=False
        )
        if done.returncode != 0 or b":$7$" not in passwd.read_bytes():
            passwd.unlink()
            raise ConfigError(f"broker config: {tool} -U failed (exit {done.returncode})")
    acl = out / "acl"
    acl.write_text(_acl(roster, analysis, list(operators)))
    config = out / "mosquitto.conf"
    config.write_text(_conf(passwd, acl, roster, persistence))
    return BrokerFiles(passwd, acl, config, tokens, "mosquitto_passwd" if tool else "flame")
