"""The aggregation node: epoch loop, presence, sending, failures, run store, records."""
