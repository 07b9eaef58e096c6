"""Running `analyze` in a child process that holds none of the node's secrets.

The node runtime (parent) keeps the identity key, key shares, tokens and the broker
connection; the child gets a scrubbed environment, a socket to the parent and nothing else.
Data reads, messages and node-local state go through the parent, which counts what was read
and checks the node policy on what comes back before anything is signed and sent.
"""
