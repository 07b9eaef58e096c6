"""`flame check`: can this node run? Config, tokens, broker, data sources and storage.

An operator runs it before a run (or when one failed) on the node itself, with the node's
own settings. Each item gets one verdict with a reason and the setting to fix, so a wrong
endpoint or an expired token is found in seconds instead of after the presence timeout.
It only reads: it publishes nothing, creates no bucket and writes no file.

A service whose token failed is not contacted: the connection would fail for the same
reason and the operator would see one problem twice.

The checks run in the order of `CHECKS`, after the config and the tokens; each takes the
`CheckRun` and returns its lines, none when its part of the config is unused. A new check
is one function (in `node_checks` or a module of its own) and one line in `CHECKS`.
"""

from __future__ import annotations

from collections.abc import Callable

from flame.config import FlameConfig
from flame.ops import check_install
from flame.ops.broker_probe import (
    BrokerUnavailable,
    broker_address,
    broker_username,
    connect_broker,
)
from flame.ops.check_items import CheckItem, CheckReport, CheckRun, masked
from flame.ops.node_checks import (
    broker_checks,
    check_config,
    check_data_dir,
    check_storage,
    check_tokens,
    data_checks,
    key_checks,
    policy_checks,
    storage_checks,
)

__all__ = [
    "CHECKS",
    "BrokerUnavailable",
    "CheckItem",
    "CheckReport",
    "CheckRun",
    "broker_address",
    "broker_username",
    "connect_broker",
    "preflight",
    "run_checks",
]

NodeCheck = Callable[[CheckRun], list[CheckItem]]



def install_items(run: CheckRun) -> list[CheckItem]:
    """Runtime code not writable by the node user, Landlock present (analysis nodes)."""
    return check_install.install_checks(run.config)


CHECKS: tuple[NodeCheck, ...] = (
    broker_checks,  # the broker, then identity, roster and inbox isolation over it
    data_checks,  # the data folder and every data source
    storage_checks,  # results folder or bucket
    key_checks,  # secure-aggregation key files
    policy_checks,  # the node policy and its privacy budget
    install_items,  # the runtime's own code read-only, the analysis sandbox available
)


def run_checks(*, timeout: float = 5.0) -> CheckReport:
    """Check everything this node's config uses; every item is tried, none stops the rest."""
    report = CheckReport()
    config = check_config(report)
    if config is None:
        return report
    run = CheckRun(config, timeout, frozenset(check_tokens(config, report)))
    items = [item for check in CHECKS for item in check(run)]
    secrets = config.secrets()
    report.items.extend(masked(item, secrets) for item in items)
    return report


def preflight(config: FlameConfig, *, timeout: float = 5.0) -> list[CheckItem]:
    """What `flame run` checks before joining, as `flame check` does: storage reachable and
    writable, the data folder readable. Returns the failed items (empty: go ahead)."""
    items: list[CheckItem] = []
    if config.role == "analysis" and config.data_dir is not None:
        items.append(check_data_dir(config.data_dir))
    if config.storage.endpoint is not None or config.storage.results_dir is not None:
        items.append(check_storage(config, set(), timeout))
    secrets = config.secrets()
    return [masked(item, secrets) for item in items if not item.ok]
