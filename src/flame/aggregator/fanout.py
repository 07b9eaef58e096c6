"""Who gets the aggregator's kick-off how: once on the broadcast topic, or a copy of their own.

A node gets the broadcast only when its status says one reached it (Mosquitto grants a
subscription its ACL never delivers on, so subscribing proves nothing); the first kick-off of
an aggregator process also goes out once on the topic as a probe, so that nodes can find out.
Nobody gets it when an analysis member of the roster outside the run could read the topic (the
generated ACL lets every analysis member read it), nor a node that declines other sites'
aggregates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flame.identity.roster import Roster

__all__ = ["Fanout"]


class Fanout:
    def __init__(self, participants: Sequence[str], roster: Roster | None) -> None:
        self.participants = list(participants)
        self._listening: set[str] = set()  # nodes a broadcast has reached (their statuses say)
        self._probed = False
        self._outsiders = roster is not None and any(
            member.role == "analysis" and member.node_id not in self.participants
            for member in roster
        )

    def note(self, node: str, status: dict[str, Any]) -> None:
        """A node's status: whether it says a broadcast reached it (gone with an offline one)."""
        if status.get("broadcast") is True:
            self._listening.add(node)
        else:
            self._listening.discard(node)

    def listeners(self, withheld: set[str]) -> list[str]:
        """Participants to reach with one broadcast (none unless at least two)."""
        if self._outsiders:
            return []
        takers = self._listening - withheld
        listening = [n for n in self.participants if n in takers]
        return listening if len(listening) > 1 else []

    def probe_now(self, kind: str) -> bool:
        """Whether this kick-off should also go out once on the topic, as the probe."""
        if self._probed or self._outsiders or kind == "finished":
            return False
        self._probed = True
        return True
