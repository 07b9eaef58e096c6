"""Federated layer."""
