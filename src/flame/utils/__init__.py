"""Small helpers shared by the clients and the node start-up (tokens, redaction)."""
