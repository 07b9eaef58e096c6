"""Secure sums of `flame.secure(...)` fields: single key and threshold Paillier protocols."""
