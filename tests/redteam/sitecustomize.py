"""Loaded at start-up by a `flame run` process whose PYTHONPATH holds this folder (only the
malicious node of an attack test): applies the patch named by REDTEAM_PATCH."""

import os

if os.environ.get("REDTEAM_PATCH"):
    import redteam_patches

    redteam_patches.apply(os.environ["REDTEAM_PATCH"])
