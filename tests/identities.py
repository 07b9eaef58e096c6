"""Roster and identity files for tests that start real `flame run` processes."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from flame.identity import Identity, Member, Roster, write_identity

__all__ = ["federation"]


def federation(
    directory: Path, participants: Iterable[str], aggregator: str = "aggregator"
) -> dict[str, dict[str, str]]:
    """Identities and a roster in `directory`: {node id: its FLAME_ROSTER/IDENTITY env}."""
    directory.mkdir(parents=True, exist_ok=True)
    members = {aggregator: "aggregation", **{node: "analysis" for node in participants}}
    roster = directory / "roster.toml"
    if roster.exists():  # made by an earlier call: the same federation again
        return {
            node: {
                "FLAME_ROSTER": str(roster),
                "FLAME_IDENTITY__KEY_FILE": str(directory / "keys" / f"{node}.key"),
            }
            for node in members
        }
    roster_members = []
    keys: dict[str, Path] = {}
    for node, role in members.items():
        identity = Identity.generate(node)
        keys[node], _ = write_identity(identity, directory / "keys")
        roster_members.append(Member(node, role, identity.public_text))
    Roster(roster_members).save(roster)
    return {
        node: {"FLAME_ROSTER": str(roster), "FLAME_IDENTITY__KEY_FILE": str(keys[node])}
        for node in members
    }
