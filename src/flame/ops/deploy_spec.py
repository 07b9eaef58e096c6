"""What `flame deploy` deploys: a federation kit's members, files and settings, container-side.

Both outputs (compose, Kubernetes) place the same files at the same paths in every
container, so a node's settings read the same everywhere:

  /run/secrets/identity.key, broker.token, share.json   the node's own secrets (0400)
  /etc/flame/roster.toml, public_key.json               shared, public
  /data (analysis, read-only), /results (aggregator)    the node's data and the run's results

The broker runs Mosquitto, installed into an image built FROM flame's own image by the
Containerfile written next to the manifests (no other image, no registry needed).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from flame import __version__
from flame.errors import ConfigError
from flame.ops.federation_kit import Kit

__all__ = [
    "BROKER_IMAGE",
    "FLAME_IMAGE",
    "RUNTIME_UID",
    "DeploySpec",
    "broker_conf",
    "broker_containerfile",
]

RUNTIME_UID = 10001  # the image's user (Dockerfile: USER 10001:10001)
BROKER_IMAGE = f"localhost/flame-broker:{__version__}"
FLAME_IMAGE = f"localhost/flame:{__version__}"
SECRETS_DIR = "/run/secrets"
FILES_DIR = "/etc/flame"
BROKER_DIR = "/etc/flame-broker"
BROKER_DATA = "/var/lib/flame-broker"
# what the official python image sets; podman kube play adds no PATH when an image has none
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_DNS = re.compile(r"[^a-z0-9-]+")


@dataclass(frozen=True)
class DeploySpec:
    """A kit plus the deployment's choices: images, the approved code, where data lives."""

    kit: Kit
    image: str
    code_sha256: str
    broker_image: str = BROKER_IMAGE
    flame_image: str = FLAME_IMAGE  # what the broker image is built FROM
    host_network: bool = False
    broker_port: int = 1883
    data: Mapping[str, str] = field(default_factory=dict)
    results: str | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[0-9a-f]{64}", self.code_sha256):
            raise ConfigError(
                f"deploy: approved code {self.code_sha256!r} is not a SHA-256 as `flame hash` "
                "prints it"
            )
        names = [self.name(node) for node in self.kit.members]
        if len(set(names)) != len(names) or "flame-broker" in names:
            raise ConfigError(
                f"deploy: node ids {', '.join(self.kit.members)} map to clashing Kubernetes "
                f"names ({', '.join(names)}); use ids that differ in letters or digits"
            )
        unknown = sorted(set(self.data) - set(self.kit.nodes))
        if unknown:
            raise ConfigError(f"deploy: --data names {unknown[0]!r}, not an analysis node")

    @staticmethod
    def name(node: str) -> str:
        """flame-<node> as a DNS label (Kubernetes object names, compose service names)."""
        label = _DNS.sub("-", node.lower()).strip("-")
        return f"flame-{label}"[:48].rstrip("-")  # room for "-private" and such (63 at most)

    @property
    def broker_host(self) -> str:
        return "127.0.0.1" if self.host_network else "flame-broker"

    @property
    def broker_url(self) -> str:
        return f"mqtt://{self.broker_host}:{self.broker_port}"

    def data_dir(self, node: str) -> str | None:
        return self.data.get(node) or self.kit.data.get(node)

    def settings(self) -> dict[str, str]:
        """The FLAME_* settings every node shares (a ConfigMap; compose's x-flame-settings)."""
        kit = self.kit
        values = {
            "FLAME_ANALYSIS_ID": kit.analysis_id,
            "FLAME_PARTICIPANTS": ",".join(kit.nodes),
            "FLAME_ROSTER": f"{FILES_DIR}/roster.toml",
            "FLAME_BROKER__URL": self.broker_url,
            "FLAME_BROKER__TOKEN_FILE": f"{SECRETS_DIR}/broker.token",
            "FLAME_IDENTITY__KEY_FILE": f"{SECRETS_DIR}/identity.key",
            "FLAME_APPROVED_CODE": self.code_sha256,
        }
        if kit.threshold:
            values["FLAME_SECURE__ENABLED"] = "true"
            values["FLAME_SECURE__PUBLIC_KEY_FILE"] = f"{FILES_DIR}/public_key.json"
        return values

    def node_env(self, node: str) -> dict[str, str]:
        """The settings that differ per node."""
        env = {"FLAME_NODE_ID": node, "FLAME_ROLE": self.kit.role(node), "PATH": PATH}
        if node == self.kit.aggregator:
            env["FLAME_STORAGE__RESULTS_DIR"] = "/results"
        else:
            env["FLAME_DATA_DIR"] = "/data"
            if self.kit.share(node) is not None:
                env["FLAME_SECURE__KEY_SHARE_FILE"] = f"{SECRETS_DIR}/share.json"
        return env

    def node_secrets(self, node: str) -> dict[str, Path]:
        """The node's secret files in the kit, by their name in /run/secrets."""
        files = {"identity.key": self.kit.key(node), "broker.token": self.kit.token(node)}
        share = self.kit.share(node)
        if share is not None:
            files["share.json"] = share
        return files

    def shared_files(self) -> dict[str, Path]:
        """Public files every node reads, by their name in /etc/flame."""
        files = {"roster.toml": self.kit.roster}
        if self.kit.public_key is not None:
            files["public_key.json"] = self.kit.public_key
        return files


def broker_conf(spec: DeploySpec) -> str:
    """mosquitto.conf inside the broker container: the kit's passwords and ACL, persistence."""
    bind = " 127.0.0.1" if spec.host_network else ""
    return "\n".join(
        [
            f"# flame broker for the roster with SHA-256 {_fingerprint(spec.kit)}",
            f"listener {spec.broker_port}{bind}",
            "per_listener_settings false",
            "allow_anonymous false",
            f"password_file {SECRETS_DIR}/passwd",
            f"acl_file {BROKER_DIR}/acl",
            "log_dest stderr",
            "persistence true",
            f"persistence_location {BROKER_DATA}/",
            "autosave_on_changes true",
            "autosave_interval 1",
            "max_queued_messages 0",
            "",
        ]
    )


def _fingerprint(kit: Kit) -> str:
    from flame.identity import Roster

    return Roster.load(kit.roster).fingerprint


def broker_containerfile(flame_image: str) -> str:
    """The broker image: flame's own image plus Debian's Mosquitto, run as the same user."""
    return f"""# The federation's MQTT broker: flame's image plus Mosquitto from the base's Debian.
# Build it next to flame's image (no registry needed):
#   podman build -t {BROKER_IMAGE} -f broker.Containerfile .
ARG FLAME_IMAGE={flame_image}
FROM ${{FLAME_IMAGE}}
USER root
RUN apt-get update \\
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends mosquitto \\
    && rm -rf /var/lib/apt/lists/* \\
    && install -d -o {RUNTIME_UID} -g {RUNTIME_UID} -m 0700 {BROKER_DATA}
USER {RUNTIME_UID}:{RUNTIME_UID}
ENTRYPOINT ["/usr/sbin/mosquitto", "-c", "{BROKER_DIR}/mosquitto.conf"]
"""
