"""The federation roster: who is a member, in which role, with which public signing key.

Plain TOML a person can read and diff (`flame roster add/show` write and print it):

    [[member]]
    id = "clinic-a"
    role = "analysis"
    public_key = "ed25519:..."
    key_share = 1            # optional: the member's secure-aggregation key-share id

The fingerprint is the SHA-256 of the canonical form (members sorted by id, fields in this
order), which is exactly the file `flame roster add` writes, so `sha256sum roster.toml`
shows the same value. Every node checks messages against the roster it was given; two nodes
with different rosters see each other's signatures as foreign, so compare fingerprints.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from flame.errors import ConfigError
from flame.identity.keys import Identity, parse_public_key

__all__ = ["ROLES", "Member", "Roster"]

ROLES = ("analysis", "aggregation")
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_HEADER = "# flame federation roster: every member's id, role and public signing key.\n"


@dataclass(frozen=True)
class Member:
    node_id: str
    role: str
    public_text: str
    key_share: int | None = None
    public_key: Ed25519PublicKey = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        key = parse_public_key(self.public_text, f"member {self.node_id!r}")
        object.__setattr__(self, "public_key", key)


class Roster:
    """An immutable set of members, looked up by node id."""

    def __init__(self, members: list[Member], source: str = "roster") -> None:
        by_id: dict[str, Member] = {}
        keys: dict[str, str] = {}
        for member in members:
            if not _NAME.match(member.node_id):
                raise ConfigError(
                    f"{source}: member id {member.node_id!r} may use only letters, digits, "
                    "'.', '_', '-'"
                )
            if member.role not in ROLES:
                raise ConfigError(
                    f"{source}: member {member.node_id!r} has role {member.role!r}; "
                    f"expected one of {', '.join(ROLES)}"
                )
            if member.node_id in by_id:
                raise ConfigError(f"{source}: member {member.node_id!r} is listed twice")
            if member.public_text in keys:
                raise ConfigError(
                    f"{source}: members {keys[member.public_text]!r} and {member.node_id!r} "
                    "share one public key; every node needs its own identity"
                )
            by_id[member.node_id] = member
            keys[member.public_text] = member.node_id
        self._members = dict(sorted(by_id.items()))
        self.source = source

    # --- reading ------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: Path) -> Roster:
        what = f"FLAME_ROSTER / roster: {path}"
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"{what}: cannot read it ({exc.strerror})") from None
        return cls.loads(text, what)

    @classmethod
    def loads(cls, text: str, source: str = "roster") -> Roster:
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover
            import tomli as tomllib
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML ({exc})") from None
        unknown = set(data) - {"member"}
        if unknown:
            raise ConfigError(f"{source}: unknown top-level key(s) {', '.join(sorted(unknown))}")
        entries = data.get("member", [])
        if not isinstance(entries, list):
            raise ConfigError(f"{source}: 'member' must be an array of tables ([[member]])")
        return cls([_member(entry, i, source) for i, entry in enumerate(entries)], source)

    # --- writing ------------------------------------------------------------------------------
    def dumps(self) -> str:
        lines = [_HEADER]
        for member in self._members.values():
            lines.append("\n[[member]]\n")
            lines.append(f"id = {json.dumps(member.node_id)}\n")
            lines.append(f"role = {json.dumps(member.role)}\n")
            lines.append(f"public_key = {json.dumps(member.public_text)}\n")
            if member.key_share is not None:
                lines.append(f"key_share = {member.key_share}\n")
        return "".join(lines)

    def save(self, path: Path) -> None:
        path.write_text(self.dumps())

    def with_member(self, member: Member) -> Roster:
        """A new roster with `member` added (ConfigError if its id or key is taken)."""
        return Roster([*self._members.values(), member], self.source)

    @classmethod
    def of(cls, identities: dict[str, tuple[str, Identity]]) -> Roster:
        """A roster for {node id: (role, identity)}: what `flame simulate` makes for itself."""
        return cls(
            [Member(node, role, ident.public_text) for node, (role, ident) in identities.items()],
            "simulation roster",
        )

    # --- queries ------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """SHA-256 (hex) of the canonical form: the same value `sha256sum` gives the file."""
        return hashlib.sha256(self.dumps().encode()).hexdigest()

    def get(self, node_id: str) -> Member | None:
        return self._members.get(node_id)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._members

    def __iter__(self) -> Iterator[Member]:
        return iter(self._members.values())

    def __len__(self) -> int:
        return len(self._members)

    def ids(self, role: str | None = None) -> list[str]:
        return [m.node_id for m in self._members.values() if role is None or m.role == role]

    def check_signature(
        self, node_id: str, message: bytes, signature: bytes, role: str | None = None
    ) -> str | None:
        """None if `signature` is `node_id`'s (in `role`, if given) over `message`, else why not.

        For signatures on raw bytes (e.g. secure-aggregation contributions); callers put a
        domain prefix of their own at the start of `message`."""
        member = self._members.get(node_id)
        if member is None:
            return f"{node_id!r} is not in the roster"
        if role is not None and member.role != role:
            return f"{node_id!r} is not an {role} member of the roster"
        try:
            member.public_key.verify(signature, message)
        except InvalidSignature:
            return f"the signature is not {node_id!r}'s"
        return None

    def verifier(self, role: str | None = "analysis") -> Callable[[str, bytes, bytes], str | None]:
        """`check_signature` for members of `role`: the threshold protocol's Verifier."""
        return lambda node, message, signature: self.check_signature(
            node, message, signature, role
        )

    def require(self, node_id: str, role: str, what: str) -> Member:
        """The member `node_id` in `role`, or a ConfigError saying what is wrong."""
        member = self._members.get(node_id)
        if member is None:
            raise ConfigError(
                f"{what}: {node_id!r} is not in the roster ({self.source}, fingerprint "
                f"{self.fingerprint[:16]}); add it with `flame roster add`"
            )
        if member.role != role:
            raise ConfigError(
                f"{what}: {node_id!r} has role {member.role!r} in the roster, not {role!r}"
            )
        return member


def _member(entry: Any, index: int, source: str) -> Member:
    where = f"{source}: member #{index + 1}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be a table")
    unknown = set(entry) - {"id", "role", "public_key", "key_share"}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    for key in ("id", "role", "public_key"):
        if not isinstance(entry.get(key), str):
            raise ConfigError(f"{where}: {key!r} is required (a string)")
    share = entry.get("key_share")
    if share is not None and (not isinstance(share, int) or isinstance(share, bool) or share < 1):
        raise ConfigError(f"{where}: key_share must be a positive integer")
    node = entry["id"]
    return Member(node, entry["role"], entry["public_key"].strip(), share)
