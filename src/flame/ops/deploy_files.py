"""`flame deploy compose|kube`: write a kit's deployment files to a folder.

compose: OUT/compose.yaml plus the files it mounts: OUT/secrets/flame-NODE/ (the node's own
secrets, 0400 in a 0500 folder, owned by the containers' user: uid 10001 when run as root,
else the caller, whom the services then run as), OUT/files/ (roster, public key) and
OUT/broker/ (mosquitto.conf, acl). kube: OUT/federation.yaml (mode 0600: it holds the
Secrets). Both: OUT/broker.Containerfile, the broker image's recipe.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flame.errors import ConfigError
from flame.ops.deploy_kube import kube_documents
from flame.ops.deploy_spec import (
    BROKER_DATA,
    BROKER_DIR,
    FILES_DIR,
    RUNTIME_UID,
    SECRETS_DIR,
    DeploySpec,
    broker_conf,
    broker_containerfile,
)
from flame.ops.deploy_yaml import dump, dump_all

__all__ = ["Written", "compose_document", "write_compose", "write_kube"]


@dataclass(frozen=True)
class Written:
    main: Path  # compose.yaml or federation.yaml
    containerfile: Path
    user: str  # uid:gid the containers run as


def _user() -> tuple[int, int]:
    """Who the containers run as: 10001 if we can hand the files to it, else ourselves."""
    if os.name != "posix" or os.geteuid() == 0:
        return RUNTIME_UID, RUNTIME_UID
    return os.getuid(), os.getgid()


def compose_document(spec: DeploySpec, user: str) -> dict[str, Any]:
    hardening: dict[str, Any] = {
        "read_only": True,
        "user": user,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
    }
    if spec.host_network:
        hardening["network_mode"] = "host"
    services: dict[str, Any] = {
        "flame-broker": {
            "image": spec.broker_image,
            **hardening,
            "volumes": [
                f"./secrets/flame-broker:{SECRETS_DIR}:ro",
                f"./broker:{BROKER_DIR}:ro",
                f"broker-data:{BROKER_DATA}",
            ],
        }
    }
    for node in spec.kit.members:
        name = spec.name(node)
        volumes = [f"./secrets/{name}:{SECRETS_DIR}:ro", f"./files:{FILES_DIR}:ro"]
        if node == spec.kit.aggregator:
            volumes.append(f"{spec.results}:/results" if spec.results else "results:/results")
        else:
            data = spec.data_dir(node)
            if not data:
                raise ConfigError(
                    f"deploy compose: no data folder for {node}; give --data {node}=DIR"
                )
            volumes.append(f"{data}:/data:ro")
        env = {**spec.settings(), **spec.node_env(node)}
        env.pop("PATH")
        services[name] = {
            "image": spec.image,
            **hardening,
            "tmpfs": ["/tmp"],  # noqa: S108 - the container's own scratch space
            "labels": {"flame.dev/code-sha256": spec.code_sha256},
            "environment": env,
            "volumes": volumes,
            "depends_on": ["flame-broker"],
        }
    document: dict[str, Any] = {"services": services, "volumes": {"broker-data": {}}}
    if not spec.results:
        document["volumes"]["results"] = {}
    return document


def _fresh(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"deploy: {out} exists and is not empty; refusing to overwrite")
    out.mkdir(parents=True, exist_ok=True)


def _private_folder(folder: Path, files: dict[str, str], uid: int, gid: int) -> None:
    folder.mkdir(parents=True)
    for name, text in files.items():
        path = folder / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        if os.name == "posix" and os.geteuid() == 0:
            os.chown(path, uid, gid)
    if os.name == "posix" and os.geteuid() == 0:
        os.chown(folder, uid, gid)
    folder.chmod(0o500)


def write_compose(spec: DeploySpec, out: Path) -> Written:
    uid, gid = _user()
    user = f"{uid}:{gid}"
    document = compose_document(spec, user)  # a missing data folder fails before any write
    _fresh(out)
    (out / "secrets").mkdir()
    passwd = (spec.kit.broker_dir / "passwd").read_text()
    _private_folder(out / "secrets" / "flame-broker", {"passwd": passwd}, uid, gid)
    for node in spec.kit.members:
        files = {key: path.read_text() for key, path in spec.node_secrets(node).items()}
        _private_folder(out / "secrets" / spec.name(node), files, uid, gid)
    (out / "files").mkdir()
    for key, path in spec.shared_files().items():
        (out / "files" / key).write_text(path.read_text())
    (out / "broker").mkdir()
    (out / "broker" / "mosquitto.conf").write_text(broker_conf(spec))
    (out / "broker" / "acl").write_text((spec.kit.broker_dir / "acl").read_text())
    main = out / "compose.yaml"
    header = (
        f"flame federation {spec.kit.analysis_id}: `podman-compose up` or `docker compose up`\n"
        f"approved code (flame hash): {spec.code_sha256}"
    )
    main.write_text(
        "".join(f"# {line}\n" for line in header.splitlines()) + dump(document)
    )
    containerfile = out / "broker.Containerfile"
    containerfile.write_text(broker_containerfile(spec.flame_image))
    return Written(main, containerfile, user)


def write_kube(spec: DeploySpec, out: Path) -> Written:
    _fresh(out)
    main = out / "federation.yaml"
    header = (
        f"flame federation {spec.kit.analysis_id}: kubectl apply -f federation.yaml\n"
        f"approved code (flame hash): {spec.code_sha256}\n"
        "This file holds the nodes' Secrets: keep it private (mode 0600), or apply and delete it."
    )
    fd = os.open(main, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(dump_all(kube_documents(spec), header))
    containerfile = out / "broker.Containerfile"
    containerfile.write_text(broker_containerfile(spec.flame_image))
    return Written(main, containerfile, f"{RUNTIME_UID}:{RUNTIME_UID}")
