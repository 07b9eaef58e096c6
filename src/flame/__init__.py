"""flame: federated analytics as two plain functions."""
