"""`flame federation init DIR`: a whole local federation in one folder, for a first try.

What a federation needs before its first run (identities, the roster, broker passwords and
ACL, threshold key shares, each node's settings) takes a dozen commands by hand; this writes
it all at once with the same functions those commands use, plus a run script. On one machine
only: in production every member makes its own identity on its own machine (the .key never
leaves it), which the kit cannot do for them. `flame deploy` turns a kit into a compose file
or Kubernetes manifests.

DIR/
  federation.json         what the kit holds (no secrets): read by `flame deploy`
  roster.toml             every member's id, role and public key
  keys/NODE.key (0600)    each member's Ed25519 signing key; keys/NODE.pub its public half
  broker/                 passwd (0600), acl, mosquitto.conf, tokens/NODE.token (0600),
                          local.conf (a listener plus the above, for `run.sh`)
  threshold/              public_key.json, share-NODE.json (0600); with --threshold only
  env/NODE.env            the node's FLAME_* settings (paths only, no secret values)
  run.sh                  starts the broker and every node here; results in out/, logs in
                          logs/, share holders' state (--threshold) in state/NODE/
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flame.errors import ConfigError

__all__ = ["KIT_FILE", "Kit", "init_federation", "resolve_approval"]

KIT_FILE = "federation.json"
_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_./:@,+=%-]*$")  # sourced by sh unquoted: no spaces
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Kit:
    """A federation kit on disk: its facts, and where each of its files is."""

    root: Path
    analysis_id: str
    aggregator: str
    nodes: tuple[str, ...]
    broker_host: str = "127.0.0.1"
    broker_port: int = 1883
    threshold: int | None = None
    approved_code: str | None = None
    data: Mapping[str, str] = field(default_factory=dict)
    # files made by hand elsewhere (`from_files`): "roster", "keys", "broker", "threshold"
    places: Mapping[str, Path] = field(default_factory=dict)

    def _place(self, name: str, default: str) -> Path:
        return self.places.get(name, self.root / default)

    @property
    def members(self) -> tuple[str, ...]:
        return (self.aggregator, *self.nodes)

    def role(self, node: str) -> str:
        return "aggregation" if node == self.aggregator else "analysis"

    @property
    def roster(self) -> Path:
        return self._place("roster", "roster.toml")

    def key(self, node: str) -> Path:
        return self._place("keys", "keys") / f"{node}.key"

    def token(self, node: str) -> Path:
        return self.broker_dir / "tokens" / f"{node}.token"

    @property
    def broker_dir(self) -> Path:
        return self._place("broker", "broker")

    @property
    def public_key(self) -> Path | None:
        return self._place("threshold", "threshold") / "public_key.json" if self.threshold else None

    def share(self, node: str) -> Path | None:
        if not self.threshold or node == self.aggregator:
            return None
        return self._place("threshold", "threshold") / f"share-{node}.json"

    def env_file(self, node: str) -> Path:
        return self.root / "env" / f"{node}.env"

    def to_json(self) -> dict[str, Any]:
        return {
            "analysis_id": self.analysis_id,
            "aggregator": self.aggregator,
            "nodes": list(self.nodes),
            "broker": {"host": self.broker_host, "port": self.broker_port},
            "threshold": self.threshold,
            "approved_code": self.approved_code,
            "data": dict(self.data),
        }

    @classmethod
    def from_files(
        cls,
        roster: Path,
        keys: Path,
        broker: Path,
        *,
        analysis_id: str,
        port: int = 1883,
        threshold_dir: Path | None = None,
    ) -> Kit:
        """A kit from files made by hand: the roster, `flame keys identity --out KEYS`,
        `flame broker config --out BROKER`, `flame keys generate --threshold --out DIR`."""
        from flame.identity import Roster

        members = Roster.load(roster)
        aggregators = [m.node_id for m in members if m.role == "aggregation"]
        if len(aggregators) != 1:
            raise ConfigError(f"{roster}: needs exactly one aggregation member, not {aggregators}")
        places = {"roster": roster, "keys": keys, "broker": broker}
        threshold = None
        if threshold_dir is not None:
            places["threshold"] = threshold_dir
            try:
                public = json.loads((threshold_dir / "public_key.json").read_text())
                threshold = int(public["threshold"]["t"])
            except (OSError, ValueError, KeyError, TypeError):
                raise ConfigError(
                    f"--threshold-keys {threshold_dir}: no threshold public_key.json there"
                ) from None
        kit = cls(
            root=roster.parent.resolve(),
            analysis_id=analysis_id,
            aggregator=aggregators[0],
            nodes=tuple(m.node_id for m in members if m.role == "analysis"),
            broker_port=port,
            threshold=threshold,
            places={name: path.resolve() for name, path in places.items()},
        )
        missing = [
            str(path)
            for node in kit.members
            for path in (kit.key(node), kit.token(node), kit.share(node))
            if path is not None and not path.is_file()
        ]
        if missing:
            raise ConfigError(f"deploy: missing {', '.join(missing[:3])}")
        return kit

    @classmethod
    def load(cls, root: Path) -> Kit:
        """Read DIR/federation.json (written by `flame federation init`)."""
        path = root / KIT_FILE
        try:
            facts = json.loads(path.read_text())
            broker = facts["broker"]
            threshold = facts.get("threshold")
            if threshold is not None and (type(threshold) is not int or threshold < 1):
                raise ValueError(f"threshold {threshold!r}")
            kit = cls(
                root=root.resolve(),
                analysis_id=str(facts["analysis_id"]),
                aggregator=str(facts["aggregator"]),
                nodes=tuple(str(n) for n in facts["nodes"]),
                broker_host=str(broker["host"]),
                broker_port=int(broker["port"]),
                threshold=threshold,
                approved_code=facts.get("approved_code"),
                data={str(k): str(v) for k, v in (facts.get("data") or {}).items()},
            )
        except FileNotFoundError:
            raise ConfigError(
                f"{root}: not a federation kit (no {KIT_FILE}); make one with "
                "`flame federation init DIR --nodes a,b,c`"
            ) from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{path}: not a valid federation kit file ({exc!r})") from None
        kit._check_roster()
        return kit

    def _check_roster(self) -> None:
        """The members named in federation.json are the roster's, in the same roles."""
        from flame.identity import Roster

        roles = {m.node_id: m.role for m in Roster.load(self.roster)}
        if roles != {node: self.role(node) for node in self.members}:
            raise ConfigError(
                f"{self.root / KIT_FILE}: its members ({', '.join(self.members)}) are not the "
                f"roster's ({', '.join(sorted(roles))}, in {self.roster})"
            )


def resolve_approval(value: str) -> str:
    """`--approve`: a SHA-256 as `flame hash` prints it, or an analysis to hash now."""
    if _SHA256.match(value):
        return value
    path = Path(value)
    if not path.exists():
        raise ConfigError(
            f"--approve {value}: neither a 64-hex-digit SHA-256 nor an analysis file or folder"
        )
    from flame.analysis.code_hash import analysis_code_hash

    return analysis_code_hash(path)


def _check_value(name: str, value: str) -> str:
    if not _SAFE_VALUE.match(value):
        raise ConfigError(
            f"{name}={value!r}: the kit's env files are read by sh and container engines "
            "unquoted; use a path without spaces, quotes or shell characters"
        )
    return value


def _env_lines(kit: Kit, node: str) -> list[str]:
    settings: dict[str, str] = {
        "FLAME_NODE_ID": node,
        "FLAME_ROLE": kit.role(node),
        "FLAME_ANALYSIS_ID": kit.analysis_id,
        "FLAME_PARTICIPANTS": ",".join(kit.nodes),
        "FLAME_ROSTER": str(kit.roster),
        "FLAME_BROKER__URL": f"mqtt://{kit.broker_host}:{kit.broker_port}",
        "FLAME_BROKER__TOKEN_FILE": str(kit.token(node)),
        "FLAME_IDENTITY__KEY_FILE": str(kit.key(node)),
    }
    if kit.role(node) == "analysis":
        if kit.approved_code:
            settings["FLAME_APPROVED_CODE"] = kit.approved_code
        if node in kit.data:
            settings["FLAME_DATA_DIR"] = kit.data[node]
    if kit.public_key is not None:
        settings["FLAME_SECURE__ENABLED"] = "true"
        settings["FLAME_SECURE__PUBLIC_KEY_FILE"] = str(kit.public_key)
        share = kit.share(node)
        if share is not None:
            settings["FLAME_SECURE__KEY_SHARE_FILE"] = str(share)
            # node storage: the share holder's differencing guard survives a restart
            settings["FLAME_STORAGE__RESULTS_DIR"] = str(kit.root / "state" / node)
    lines = [f"# flame settings of {node} ({kit.role(node)}) in the federation kit {kit.root}"]
    lines += [f"{name}={_check_value(name, value)}" for name, value in settings.items()]
    if kit.role(node) == "analysis" and node not in kit.data:
        lines.append("# FLAME_DATA_DIR=/path/to/this/node's/data  (or set it before run.sh)")
    return lines


def _run_script(kit: Kit) -> str:
    order = " ".join([*kit.nodes, kit.aggregator])
    _check_value("the Python running flame", sys.executable)
    return f"""#!/bin/sh
# Runs the federation of this kit on this machine: Mosquitto with the kit's passwords and ACL,
# then every node with its own settings (env/NODE.env). Each node's result: out/NODE.json;
# logs: logs/. Exit 0 when every node finished. Written by `flame federation init`.
# usage: run.sh ANALYSIS    (a folder or .py file, as for `flame run`)
set -eu
kit=$(cd "$(dirname "$0")" && pwd)
[ "$#" -eq 1 ] || {{ echo "usage: $0 ANALYSIS" >&2; exit 2; }}
analysis=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
mosquitto=$(command -v mosquitto || command -v /usr/sbin/mosquitto) || {{
    echo "run.sh: needs the mosquitto broker (apt-get install mosquitto)" >&2; exit 2; }}
if command -v flame >/dev/null 2>&1; then set -- flame; else set -- {sys.executable} -m flame; fi
mkdir -p "$kit/out" "$kit/logs" "$kit/broker-data" "$kit/state"
"$mosquitto" -c "$kit/broker/local.conf" > "$kit/logs/broker.log" 2>&1 &
broker=$!
trap 'kill "$broker" 2>/dev/null || true' EXIT INT TERM
tries=0
until grep -q " running" "$kit/logs/broker.log" 2>/dev/null; do
    tries=$((tries + 1))
    if [ "$tries" -gt 100 ] || ! kill -0 "$broker" 2>/dev/null; then
        echo "run.sh: the broker did not start:" >&2; cat "$kit/logs/broker.log" >&2; exit 1
    fi
    sleep 0.1
done
pids=""
for node in {order}; do
    (set -a; . "$kit/env/$node.env"; set +a; exec "$@" run "$analysis") \\
        > "$kit/out/$node.json" 2> "$kit/logs/$node.log" &
    pids="$pids $!"
done
status=0
for pid in $pids; do wait "$pid" || status=1; done
if [ "$status" -ne 0 ]; then
    echo "run.sh: a node failed; the last lines of each log:" >&2
    tail -n 3 "$kit"/logs/*.log >&2
fi
exit "$status"
"""


def _local_conf(kit: Kit, snippet: str) -> str:
    lines = [
        "# Mosquitto for run.sh: a loopback listener and the kit's passwords, ACL, persistence",
        f"listener {kit.broker_port} {kit.broker_host}",
        "log_dest stderr",
        snippet,
    ]
    if os.name == "posix" and os.geteuid() == 0:  # as root it would switch to `mosquitto`
        lines += ["# the kit's files belong to root, who made them", "user root"]
    return "\n".join(lines) + "\n"


def init_federation(
    root: Path,
    nodes: Sequence[str],
    aggregator: str = "aggregator",
    *,
    analysis_id: str = "study-1",
    host: str = "127.0.0.1",
    port: int = 1883,
    threshold: int | None = None,
    bits: int = 2048,
    approved_code: str | None = None,
    data: Mapping[str, Path] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Kit:
    """Write a kit to `root` (new or empty); see the module docstring. `bits` sizes the
    threshold key; `data` gives analysis nodes their FLAME_DATA_DIR."""
    from flame.identity import Identity, Member, Roster, write_identity
    from flame.identity.broker_config import write_broker_config

    members = [aggregator, *nodes]
    if not nodes:
        raise ConfigError("federation init: --nodes names no analysis node")
    if len(set(members)) != len(members):
        raise ConfigError(f"federation init: a node id is given twice in {', '.join(members)}")
    unknown = sorted(set(data or {}) - set(nodes))
    if unknown:
        raise ConfigError(f"federation init: --data names {unknown[0]!r}, not one of --nodes")
    if threshold is not None and not 1 <= threshold <= len(nodes):
        raise ConfigError(
            f"federation init: --threshold {threshold} must be between 1 and the number of "
            f"analysis nodes ({len(nodes)})"
        )
    if not 0 < port < 65536:
        raise ConfigError(f"federation init: --port {port} is not a TCP port")
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ConfigError(f"federation init: {root} exists and is not empty; refusing to overwrite")
    root.mkdir(parents=True, exist_ok=True)
    root = root.resolve()
    _check_value("the kit folder", str(root))
    kit = Kit(
        root=root,
        analysis_id=analysis_id,
        aggregator=aggregator,
        nodes=tuple(nodes),
        broker_host=host,
        broker_port=port,
        threshold=threshold,
        approved_code=approved_code,
        data={node: str(Path(path).resolve()) for node, path in (data or {}).items()},
    )
    identities = {node: Identity.generate(node) for node in members}
    roster = Roster(  # validates the ids before anything is written
        [Member(node, kit.role(node), identities[node].public_text) for node in members],
        "--nodes/--aggregator",
    )
    _check_all_env(kit)
    for identity in identities.values():
        write_identity(identity, root / "keys")
    roster.save(kit.roster)
    files = write_broker_config(roster, kit.broker_dir, persistence=root / "broker-data")
    (kit.broker_dir / "local.conf").write_text(_local_conf(kit, files.config.read_text()))
    if threshold is not None:
        _deal(kit, threshold, bits, progress)
    (root / "env").mkdir()
    for node in members:
        kit.env_file(node).write_text("\n".join(_env_lines(kit, node)) + "\n")
    script = root / "run.sh"
    script.write_text(_run_script(kit))
    script.chmod(0o755)
    (root / KIT_FILE).write_text(json.dumps(kit.to_json(), indent=2) + "\n")
    return kit


def _check_all_env(kit: Kit) -> list[list[str]]:
    """Every env file's lines, computed before writing anything: a bad value fails early."""
    return [_env_lines(kit, node) for node in kit.members]


def _deal(kit: Kit, threshold: int, bits: int, progress: Callable[[str], None] | None) -> None:
    """A trusted dealer's shares, as `flame keys generate --threshold` deals them."""
    from flame.protocols.paillier.threshold import generate_threshold_key
    from flame.protocols.paillier.threshold_files import write_threshold_key

    public, shares = generate_threshold_key(bits, threshold, list(kit.nodes), progress)
    write_threshold_key(kit.root / "threshold", public, shares)
    del shares
