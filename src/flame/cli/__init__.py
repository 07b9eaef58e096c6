"""The `flame` command line (also `python -m flame`); the only layer that prints."""

from flame.cli.app import main

__all__ = ["main"]
