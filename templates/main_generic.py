"""Container entry point: `python main_generic.py` (or `flame run .`) plays this node's role.

The node's role, id, peers and services come from FLAME_* environment variables or a config
file named by FLAME_CONFIG; see flame's docs/reference/settings.md. Locally, try
    flame simulate . --data path/to/data     (one sub-folder per simulated node)
"""

import json
import sys

from aggregator_generic import aggregate, converged
from analyzer_generic import analyze

import flame

if __name__ == "__main__":
    try:
        result = flame.run(analyze=analyze, aggregate=aggregate, converged=converged)
    except flame.FlameError as exc:
        print(f"flame: error: {exc}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(result, default=str))
