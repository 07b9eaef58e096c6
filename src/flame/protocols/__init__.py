"""Cryptographic protocols used by the federated layer; they know nothing of the network.

Each protocol is a package of its own (`flame.protocols.paillier`); import from it directly.
"""
