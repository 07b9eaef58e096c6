"""Clients of the services a node talks to: data APIs, object storage, the message broker."""
