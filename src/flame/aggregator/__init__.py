"""The aggregation node: epoch loop, presence and run choice, fanout, run store, records."""
