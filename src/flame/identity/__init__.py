"""Authenticated federation: node identities, the roster, signed messages.

Why: a message's `sender` field is only a claim. With a roster (every member's id, role and
Ed25519 public key) and a signature on every envelope and status, a receiver knows which
member really sent it, and drops anything else before acting on it.

The small internal API other parts of flame use:

* `Identity.load(node_id, path)` / `Identity.generate(node_id)`: this node's signing key
  (files must be 0600; `flame keys identity` writes them). `check_private_file(path, what)`
  refuses any secret file readable by group/others (key shares too).
* `Roster.load(path)`, `roster.get(node_id) -> Member(node_id, role, public_key, key_share)`,
  `roster.fingerprint`, `roster.ids(role)`.
* `Authenticator(identity, roster)`: what a transport holds (`transport.auth`). Transports
  sign every envelope and status with it and verify everything received before decoding it;
  failures are dropped, counted (`transport.rejected`) and logged at WARNING.
* Every envelope a transport returns carries `envelope.signed`: the exact signed bytes. To
  forward a node's signed contribution to a third party, send those bytes (e.g. as a `bytes`
  value in a body); the third party calls
  `verify_envelope(blob, roster, sender="clinic-a", kind="result") -> Envelope` and so checks
  the contributor's own signature, not the forwarder's word. It raises `SignatureError`.
* `open_signed(blob, roster) -> SignedFrame(signer, frame)`: the same check without decoding.
* `status_signed_by(roster, analysis_id, node, status_dict) -> bool`: for status readers.
* `for_config(config, node_id)`: the Authenticator a node run uses (None only when the
  operator opted out with FLAME_ALLOW_UNSIGNED=true); `throwaway(nodes)`: identities and a
  roster that live only in this process (`flame simulate`), so the signed path always runs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from flame.errors import ConfigError
from flame.identity.keys import Identity, check_private_file, parse_public_key, write_identity
from flame.identity.roster import ROLES, Member, Roster
from flame.identity.signing import (
    Authenticator,
    SignatureError,
    SignedFrame,
    open_signed,
    status_signed_by,
    verify_envelope,
)

if TYPE_CHECKING:
    from flame.config import FlameConfig

__all__ = [
    "ROLES",
    "Authenticator",
    "Identity",
    "Member",
    "Roster",
    "SignatureError",
    "SignedFrame",
    "check_private_file",
    "for_config",
    "open_signed",
    "parse_public_key",
    "status_signed_by",
    "throwaway",
    "verify_envelope",
    "write_identity",
]

log = logging.getLogger(__name__)


def load_roster(config: FlameConfig) -> Roster | None:
    return None if config.roster is None else Roster.load(config.roster)


def for_config(config: FlameConfig, node_id: str) -> Authenticator | None:
    """This node's Authenticator from FLAME_ROSTER and FLAME_IDENTITY__KEY_FILE.

    Both are required unless FLAME_ALLOW_UNSIGNED=true, which is logged loudly. Also checks
    that the roster knows this node, the aggregator and every participant in their roles."""
    if config.roster is None or config.identity.key_file is None:
        if config.allow_unsigned:
            log.warning(
                "UNSIGNED RUN (FLAME_ALLOW_UNSIGNED=true): no roster, no signatures; anyone who "
                "can publish on the broker can impersonate any node, including the aggregator"
            )
            return None
        missing = []
        if config.roster is None:
            missing.append("FLAME_ROSTER / roster: required (the federation's roster file)")
        if config.identity.key_file is None:
            missing.append(
                "FLAME_IDENTITY__KEY_FILE / identity.key_file: required (this node's signing "
                "key: flame keys identity NODE_ID --out DIR)"
            )
        missing.append(
            "(to run without authentication set FLAME_ALLOW_UNSIGNED=true: nothing is then "
            "protected against forged messages)"
        )
        raise ConfigError("\n".join(missing))
    roster = Roster.load(config.roster)
    identity = Identity.load(node_id, config.identity.key_file)
    check_members(roster, config.aggregator_id, config.participants)
    try:
        return Authenticator(identity, roster)
    except Exception as exc:
        raise ConfigError(f"FLAME_IDENTITY__KEY_FILE / identity.key_file: {exc}") from None


def check_members(roster: Roster, aggregator_id: str, participants: Iterable[str]) -> None:
    roster.require(aggregator_id, "aggregation", "FLAME_AGGREGATOR_ID / aggregator_id")
    for node in participants:
        roster.require(node, "analysis", "FLAME_PARTICIPANTS / participants")


def throwaway(aggregator_id: str, participants: Iterable[str]) -> dict[str, Authenticator]:
    """Fresh identities and a roster for a simulation: {node id: Authenticator}."""
    identities = {aggregator_id: ("aggregation", Identity.generate(aggregator_id))}
    for node in participants:
        identities[node] = ("analysis", Identity.generate(node))
    roster = Roster.of(identities)
    return {node: Authenticator(ident, roster) for node, (_, ident) in identities.items()}

