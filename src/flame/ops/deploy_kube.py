"""`flame deploy kube`: plain Kubernetes manifests for a federation kit (no Helm, no operator).

One Pod per member plus the broker's, each non-root (uid 10001), read-only root file system,
no privilege escalation, all capabilities dropped, no service-account token. Each node's
secrets (signing key, broker token, key share) are a Secret of its own, mounted with
defaultMode 0400; shared settings a ConfigMap. The approved code hash is in every node's
settings (FLAME_APPROVED_CODE, in that ConfigMap; not an annotation: podman 4.3 refuses
annotation values over 63 characters, and a SHA-256 has 64).

Why an init container copies the secrets: a Secret volume's files belong to root; with
fsGroup, Kubernetes makes them group-readable (0440), which flame refuses for a private key
(as ssh would). The init container, as the same non-root user, copies them into a memory
volume as 0400 files of that user, which the node reads. It also makes podman's `kube play`
(which ignores defaultMode) run the same manifests.
"""

from __future__ import annotations

import base64
from typing import Any

from flame.ops.deploy_spec import (
    BROKER_DATA,
    BROKER_DIR,
    FILES_DIR,
    PATH,
    RUNTIME_UID,
    SECRETS_DIR,
    DeploySpec,
    broker_conf,
)

__all__ = ["kube_documents", "pod_security", "secret_documents"]

SECRET_MODE = 0o400
_PODMAN_INIT = "io.podman.annotations.init.container.type"
# where the Secret volume is mounted, for the init container that copies its files
_SECRET_SOURCE = "/run/flame-secret"  # noqa: S105 - a path, not a password


def pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUNTIME_UID,
        "runAsGroup": RUNTIME_UID,
        "fsGroup": RUNTIME_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUNTIME_UID,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }


def _meta(name: str, component: str, **extra: Any) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": "flame", "app.kubernetes.io/component": component}
    return {"name": name, "labels": labels, **extra}


def _secret(name: str, component: str, files: dict[str, str]) -> dict[str, Any]:
    # `data` (base64), not stringData: podman 4.3 reads only `data`
    data = {key: base64.b64encode(text.encode()).decode() for key, text in files.items()}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(name, component),
        "type": "Opaque",
        "data": data,
    }


def _config_map(name: str, component: str, data: dict[str, str]) -> dict[str, Any]:
    metadata = _meta(name, component)
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}


def _secret_volumes(secret: str) -> list[dict[str, Any]]:
    return [
        {
            "name": "secret",
            # optional: false spelled out: podman 4.3's kube play dereferences it unchecked
            "secret": {"secretName": secret, "defaultMode": SECRET_MODE, "optional": False},
        },
        {"name": "private", "emptyDir": {"medium": "Memory"}},
        {"name": "tmp", "emptyDir": {"medium": "Memory"}},
    ]


def _copy_secrets(image: str, names: list[str]) -> dict[str, Any]:
    """The init container: the Secret's files -> /run/secrets as 0400 files of uid 10001."""
    return {
        "name": "secrets",
        "image": image,
        "command": [
            "/usr/bin/install",
            "-m",
            "0400",
            *(f"{_SECRET_SOURCE}/{name}" for name in names),
            f"{SECRETS_DIR}/",
        ],
        "securityContext": _container_security(),
        "volumeMounts": [
            {"name": "secret", "mountPath": _SECRET_SOURCE, "readOnly": True},
            {"name": "private", "mountPath": SECRETS_DIR},
        ],
    }


def _pod(spec: DeploySpec, name: str, component: str, body: dict[str, Any]) -> dict[str, Any]:
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security(),
    }
    if spec.host_network:
        pod_spec["hostNetwork"] = True
    pod_spec.update(body)
    # podman's kube play makes an emptyDir a named volume shared by every pod using that
    # name: scope each volume's name by its pod's, as Kubernetes scopes them anyway
    for volume in pod_spec["volumes"]:
        volume["name"] = f"{name}-{volume['name']}"
    for container in pod_spec["containers"] + pod_spec["initContainers"]:
        for mount in container["volumeMounts"]:
            mount["name"] = f"{name}-{mount['name']}"
    # podman: run the init container at every start and keep it (its default, "once", races
    # with the container's exit in podman 4.3); Kubernetes ignores the annotation
    metadata = _meta(name, component, annotations={_PODMAN_INIT: "always"})
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}


def _node_pod(spec: DeploySpec, node: str) -> dict[str, Any]:
    name = spec.name(node)
    aggregator = node == spec.kit.aggregator
    mounts = [
        {"name": "private", "mountPath": SECRETS_DIR, "readOnly": True},
        {"name": "files", "mountPath": FILES_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - the container's own scratch space
    ]
    volumes = [
        *_secret_volumes(f"{name}-secret"),
        {"name": "files", "configMap": {"name": "flame-files"}},
    ]
    if aggregator:
        mounts.append({"name": "results", "mountPath": "/results"})
        volumes.append(
            {"name": "results", "hostPath": {"path": spec.results, "type": "Directory"}}
            if spec.results
            else {"name": "results", "emptyDir": {}}
        )
    else:
        data = spec.data_dir(node)
        mounts.append({"name": "data", "mountPath": "/data", "readOnly": True})
        volumes.append(
            {"name": "data", "hostPath": {"path": data, "type": "Directory"}}
            if data
            else {"name": "data", "persistentVolumeClaim": {"claimName": f"{name}-data"}}
        )
    container = {
        "name": "node",
        "image": spec.image,
        "env": [{"name": k, "value": v} for k, v in spec.node_env(node).items()],
        "envFrom": [{"configMapRef": {"name": "flame-settings"}}],
        "securityContext": _container_security(),
        "volumeMounts": mounts,
    }
    body = {
        "restartPolicy": "Never",  # a run ends with an exit code; a restart is a new run's job
        "initContainers": [_copy_secrets(spec.image, sorted(spec.node_secrets(node)))],
        "containers": [container],
        "volumes": volumes,
    }
    component = "aggregation" if aggregator else "analysis"
    return _pod(spec, name, component, body)


def _broker_pod(spec: DeploySpec) -> dict[str, Any]:
    container = {
        "name": "mosquitto",
        "image": spec.broker_image,
        "env": [{"name": "PATH", "value": PATH}],
        "securityContext": _container_security(),
        "volumeMounts": [
            {"name": "private", "mountPath": SECRETS_DIR, "readOnly": True},
            {"name": "config", "mountPath": BROKER_DIR, "readOnly": True},
            {"name": "data", "mountPath": BROKER_DATA},
        ],
    }
    if not spec.host_network:  # podman refuses port mappings on the host's network
        container["ports"] = [{"containerPort": spec.broker_port, "name": "mqtt"}]
    body = {
        "restartPolicy": "Always",
        "initContainers": [_copy_secrets(spec.broker_image, ["passwd"])],
        "containers": [container],
        "volumes": [
            *_secret_volumes("flame-broker-secret")[:2],
            {"name": "config", "configMap": {"name": "flame-broker"}},
            {"name": "data", "emptyDir": {}},
        ],
    }
    return _pod(spec, "flame-broker", "broker", body)


def secret_documents(spec: DeploySpec) -> list[dict[str, Any]]:
    """The Secrets: the broker's password file and each node's own files."""
    broker = {"passwd": (spec.kit.broker_dir / "passwd").read_text()}
    # "-secret": podman 4.3 looks a Secret volume up among ConfigMaps first, by name
    documents = [_secret("flame-broker-secret", "broker", broker)]
    for node in spec.kit.members:
        files = {key: path.read_text() for key, path in spec.node_secrets(node).items()}
        documents.append(_secret(f"{spec.name(node)}-secret", spec.kit.role(node), files))
    return documents


def kube_documents(spec: DeploySpec) -> list[dict[str, Any]]:
    """Every object, in the order `kubectl apply -f` should create them."""
    shared = {key: path.read_text() for key, path in spec.shared_files().items()}
    broker_files = {
        "mosquitto.conf": broker_conf(spec),
        "acl": (spec.kit.broker_dir / "acl").read_text(),
    }
    documents = [
        _config_map("flame-settings", "settings", spec.settings()),
        _config_map("flame-files", "settings", shared),
        _config_map("flame-broker", "broker", broker_files),
        *secret_documents(spec),
    ]
    if not spec.host_network:
        documents.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": _meta("flame-broker", "broker"),
                "spec": {
                    "selector": {"app.kubernetes.io/component": "broker"},
                    "ports": [{"name": "mqtt", "port": spec.broker_port}],
                },
            }
        )
    documents.append(_broker_pod(spec))
    documents += [_node_pod(spec, node) for node in spec.kit.members]
    return documents
