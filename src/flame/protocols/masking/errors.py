"""Errors of the masking protocol: every refusal is a SecureAggregationError subclass."""

from __future__ import annotations

from flame.protocols.paillier.errors import SecureAggregationError

__all__ = ["MaskingError", "ProtocolViolation"]


class MaskingError(SecureAggregationError):
    """The masking protocol cannot go on (too few nodes left, bad settings, a bad sum).

    Messages name nodes and rounds, never key material, seeds, shares or values."""


class ProtocolViolation(MaskingError):
    """A message was refused: wrong binding, round or signature, a replay, or a request the
    protocol forbids (such as both kinds of shares of one node). Nothing was revealed."""
