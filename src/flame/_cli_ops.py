"""Operator commands (init, check, status), kept apart from the analyst's commands."""

from __future__ import annotations

import argparse
from typing import Any


def add_commands(commands: argparse._SubParsersAction[Any]) -> None:
    """Register the operator sub-commands on the `flame` parser."""
