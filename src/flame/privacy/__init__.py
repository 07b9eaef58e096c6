"""What may leave a node: node policy, release gate, small cells, DP markers and budget ledger."""
