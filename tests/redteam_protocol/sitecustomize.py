"""Loaded at start-up by a `flame run` process whose PYTHONPATH holds this folder (only the
malicious process of a test in test_attacks_protocol_redteam.py): applies RT_PROTOCOL_PATCH."""

import os

if os.environ.get("RT_PROTOCOL_PATCH"):
    import rt_protocol_patches

    rt_protocol_patches.apply(os.environ["RT_PROTOCOL_PATCH"])
