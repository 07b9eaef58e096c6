"""Operator tools behind the CLI: status, check, report, `flame init` scaffolding."""
