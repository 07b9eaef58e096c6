"""`flame federation init` and `flame deploy compose|kube`: the files, their modes, the manifests.

The manifests are read back with PyYAML (a test dependency only; flame writes them with its own
emitter) and checked for what an operator relies on: one Pod per member plus the broker's,
non-root, read-only root, each node's own Secret mounted 0400 and holding only its own files,
the approved code equal to `flame hash`. tests/test_container_deploy.py runs them under podman.
"""

from __future__ import annotations

import base64
import json
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from flame.analysis.code_hash import analysis_code_hash
from flame.cli import main
from flame.errors import ConfigError
from flame.identity import Identity, Roster
from flame.ops.deploy_kube import kube_documents
from flame.ops.deploy_spec import DeploySpec
from flame.ops.deploy_yaml import dump, dump_all
from flame.ops.federation_kit import Kit, init_federation

NODES = ("clinic-a", "clinic-b", "clinic_C")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def analysis(tmp_path: Path) -> Path:
    folder = tmp_path / "my-analysis"
    assert main(["init", str(folder)]) == 0
    return folder


@pytest.fixture
def kit(tmp_path: Path, analysis: Path) -> Kit:
    return init_federation(
        tmp_path / "fed",
        NODES,
        approved_code=analysis_code_hash(analysis),
        data={"clinic-a": analysis / "data" / "node_1"},
    )


# ------------------------------------------------------------------------ federation init


def test_init_writes_a_signed_federation_with_private_files(kit: Kit) -> None:
    roster = Roster.load(kit.roster)
    assert {m.node_id: m.role for m in roster} == {
        "aggregator": "aggregation",
        **dict.fromkeys(NODES, "analysis"),
    }
    for node in kit.members:
        # the key on disk is the one the roster lists for that node, and only its owner reads it
        assert Identity.load(node, kit.key(node)).public_text == roster.get(node).public_text
        assert _mode(kit.key(node)) == 0o600
        assert _mode(kit.token(node)) == 0o600
        env = dict(
            line.split("=", 1)
            for line in kit.env_file(node).read_text().splitlines()
            if line and not line.startswith("#")
        )
        assert env["FLAME_NODE_ID"] == node
        assert env["FLAME_IDENTITY__KEY_FILE"] == str(kit.key(node))
        assert env["FLAME_BROKER__TOKEN_FILE"] == str(kit.token(node))
        assert env["FLAME_PARTICIPANTS"] == ",".join(NODES)
        assert (env.get("FLAME_APPROVED_CODE") is not None) == (node != "aggregator")
        token = kit.token(node).read_text().strip()
        assert token not in kit.env_file(node).read_text()  # paths only, never the secret
    assert _mode(kit.broker_dir / "passwd") == 0o600
    acl = (kit.broker_dir / "acl").read_text()
    assert "user clinic_C\ntopic read flame/+/clinic_C/inbox" in acl
    assert "FLAME_DATA_DIR=" in kit.env_file("clinic-a").read_text()
    assert Kit.load(kit.root) == kit
    assert _mode(kit.root / "run.sh") & 0o111


def test_init_refuses_what_it_cannot_make(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    cases = [
        (tmp_path / "full", ["a", "b"], {}, "not empty"),
        (tmp_path / "dup", ["a", "a"], {}, "given twice"),
        (tmp_path / "agg", ["aggregator"], {}, "given twice"),
        (tmp_path / "bad", ["a b"], {}, "may use only letters"),
        (tmp_path / "t", ["a", "b"], {"threshold": 3}, "between 1 and"),
        (tmp_path / "data", ["a"], {"data": {"z": tmp_path}}, "'z', not one of --nodes"),
    ]
    for root, nodes, extra, says in cases:
        with pytest.raises(ConfigError, match=says):
            init_federation(root, nodes, **extra)
    assert not (tmp_path / "bad" / "keys").exists()  # validated before writing anything


def test_init_with_a_threshold_deals_one_private_share_per_analysis_node(tmp_path: Path) -> None:
    kit = init_federation(tmp_path / "fed", ["a", "b", "c"], threshold=2, bits=512)
    public = json.loads(kit.public_key.read_text())  # type: ignore[union-attr]
    assert public["threshold"]["t"] == 2
    assert sorted(m["id"] for m in public["threshold"]["members"]) == ["a", "b", "c"]
    for node in ("a", "b", "c"):
        share = kit.share(node)
        assert share is not None and _mode(share) == 0o600
        assert json.loads(share.read_text())["node"] == node
        assert f"FLAME_SECURE__KEY_SHARE_FILE={share}" in kit.env_file(node).read_text()
        assert (
            f"FLAME_STORAGE__RESULTS_DIR={kit.root}/state/{node}\n"
            in kit.env_file(node).read_text()
        )
    aggregator = kit.env_file("aggregator").read_text()
    assert "FLAME_SECURE__PUBLIC_KEY_FILE=" in aggregator and "KEY_SHARE" not in aggregator


def test_the_cli_makes_a_kit_and_refuses_a_small_threshold_key(tmp_path: Path) -> None:
    fed = tmp_path / "fed"
    assert main(["federation", "init", str(fed), "--nodes", "a,b", "--port", "18999"]) == 0
    assert "mqtt://127.0.0.1:18999" in (fed / "env" / "a.env").read_text()
    code = main(["federation", "init", str(tmp_path / "t"), "--nodes", "a,b", "--threshold",
                 "2", "--bits", "512"])  # fmt: skip
    assert code == 2 and not (tmp_path / "t").exists()


# ------------------------------------------------------------------------ the manifests


def _spec(kit: Kit, analysis: Path, **extra: Any) -> DeploySpec:
    return DeploySpec(kit, "localhost/analysis:1", analysis_code_hash(analysis), **extra)


def _kube(kit: Kit, analysis: Path, **extra: Any) -> list[dict[str, Any]]:
    text = dump_all(kube_documents(_spec(kit, analysis, **extra)))
    return list(yaml.safe_load_all(text))


def _volumes(pod: dict[str, Any], key: str = "volumes") -> dict[str, dict[str, Any]]:
    """A pod's volumes (or a container's mounts) by name, without the pod-name prefix."""
    name = pod["metadata"]["name"]
    items = pod["spec"]["volumes"] if key == "volumes" else pod["spec"]["containers"][0][key]
    assert all(item["name"].startswith(f"{name}-") for item in items)
    return {item["name"][len(name) + 1 :]: item for item in items}


def _decoded(secret: dict[str, Any]) -> dict[str, str]:
    return {key: base64.b64decode(value).decode() for key, value in secret["data"].items()}


def _pods(documents: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in documents if d["kind"] == "Pod"}


def test_one_hardened_pod_per_member_plus_the_broker(kit: Kit, analysis: Path) -> None:
    pods = _pods(_kube(kit, analysis))
    assert sorted(pods) == [
        "flame-aggregator", "flame-broker", "flame-clinic-a", "flame-clinic-b", "flame-clinic-c",
    ]  # fmt: skip
    for name, pod in pods.items():
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] == 10001
        assert spec["automountServiceAccountToken"] is False
        for container in spec["containers"] + spec["initContainers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, (name, container["name"])
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"] == {"drop": ["ALL"]}
        secrets = [v for v in spec["volumes"] if "secret" in v]
        assert len(secrets) == 1 and secrets[0]["secret"]["defaultMode"] == 0o400
        # each pod mounts its own Secret only
        assert secrets[0]["secret"]["secretName"] == f"{name}-secret"
        # the node reads /run/secrets: the init container's 0400 copies, in memory
        private = _volumes(pod)["private"]
        assert private["emptyDir"] == {"medium": "Memory"}
        assert spec["initContainers"][0]["command"][:3] == ["/usr/bin/install", "-m", "0400"]


def test_each_node_secret_holds_its_own_files_only(kit: Kit, analysis: Path) -> None:
    documents = _kube(kit, analysis)
    secrets = {d["metadata"]["name"]: _decoded(d) for d in documents if d["kind"] == "Secret"}
    for node in kit.members:
        files = secrets[f"{DeploySpec.name(node)}-secret"]
        assert files == {
            "identity.key": kit.key(node).read_text(),
            "broker.token": kit.token(node).read_text(),
        }
        others = [kit.key(n).read_text() for n in kit.members if n != node]
        assert not any(key in str(files) for key in others)
    assert secrets["flame-broker-secret"] == {"passwd": (kit.broker_dir / "passwd").read_text()}
    config = [d for d in documents if d["kind"] == "ConfigMap"]
    for node in kit.members:  # no private key or token in a ConfigMap
        assert kit.key(node).read_text() not in str(config)
        assert kit.token(node).read_text().strip() not in str(config)


def test_the_approved_code_is_what_flame_hash_prints(kit: Kit, analysis: Path) -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "flame", "hash", str(analysis)],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.strip()  # fmt: skip
    documents = _kube(kit, analysis)
    settings_map = next(d for d in documents if d["metadata"]["name"] == "flame-settings")
    assert settings_map["data"]["FLAME_APPROVED_CODE"] == printed
    for name, pod in _pods(documents).items():
        if name != "flame-broker":  # every node reads FLAME_APPROVED_CODE from that map
            env = pod["spec"]["containers"][0]["envFrom"]
            assert env == [{"configMapRef": {"name": "flame-settings"}}]


def test_settings_and_volumes_per_role(kit: Kit, analysis: Path) -> None:
    pods = _pods(_kube(kit, analysis, results="/srv/results"))
    env = {e["name"]: e["value"] for e in pods["flame-clinic-a"]["spec"]["containers"][0]["env"]}
    assert env["FLAME_NODE_ID"] == "clinic-a" and env["FLAME_ROLE"] == "analysis"
    volumes = _volumes(pods["flame-clinic-a"])
    assert volumes["data"]["hostPath"]["path"] == str(analysis / "data" / "node_1")
    mounts = _volumes(pods["flame-clinic-a"], "volumeMounts")
    assert mounts["data"]["readOnly"] is True
    # a node without a data folder gets a claim the data holder binds to its own volume
    volumes = _volumes(pods["flame-clinic-b"])
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "flame-clinic-b-data"
    volumes = _volumes(pods["flame-aggregator"])
    assert volumes["results"]["hostPath"]["path"] == "/srv/results"
    services = [d for d in _kube(kit, analysis) if d["kind"] == "Service"]
    assert [s["metadata"]["name"] for s in services] == ["flame-broker"]
    host = _kube(kit, analysis, host_network=True)
    assert not [d for d in host if d["kind"] == "Service"]
    assert all(p["spec"]["hostNetwork"] is True for p in _pods(host).values())


def test_threshold_shares_go_to_their_node_only(tmp_path: Path, analysis: Path) -> None:
    kit = init_federation(tmp_path / "fed", ["a", "b", "c"], threshold=2, bits=512)
    documents = _kube(kit, analysis)
    secrets = {d["metadata"]["name"]: _decoded(d) for d in documents if d["kind"] == "Secret"}
    for node in ("a", "b", "c"):
        assert json.loads(secrets[f"flame-{node}-secret"]["share.json"])["node"] == node
    assert "share.json" not in secrets["flame-aggregator-secret"]
    files = next(d for d in documents if d["metadata"]["name"] == "flame-files")["data"]
    assert json.loads(files["public_key.json"])["threshold"]["t"] == 2


def test_the_cli_writes_private_manifests_and_a_compose_file(
    kit: Kit, analysis: Path, tmp_path: Path
) -> None:
    base = ["deploy", "--federation", str(kit.root), "--image", "localhost/a:1"]
    assert main([base[0], "kube", *base[1:], "--out", str(tmp_path / "k")]) == 0
    manifest = tmp_path / "k" / "federation.yaml"
    assert _mode(manifest) == 0o600
    kinds = [d["kind"] for d in yaml.safe_load_all(manifest.read_text())]
    assert sorted(kinds) == sorted(["ConfigMap"] * 3 + ["Secret"] * 5 + ["Service"] + ["Pod"] * 5)
    assert "FROM ${FLAME_IMAGE}" in (tmp_path / "k" / "broker.Containerfile").read_text()
    # compose needs every analysis node's data, and says so before writing anything
    code = main([base[0], "compose", *base[1:], "--out", str(tmp_path / "c")])
    assert code == 2 and not (tmp_path / "c").exists()
    data = [f"--data=clinic-b={analysis}/data/node_2", f"--data=clinic_C={analysis}"]
    assert main([base[0], "compose", *base[1:], "--out", str(tmp_path / "c"), *data]) == 0
    compose = yaml.safe_load((tmp_path / "c" / "compose.yaml").read_text())
    services = compose["services"]
    assert sorted(services) == sorted(
        ["flame-broker", "flame-aggregator", "flame-clinic-a", "flame-clinic-b", "flame-clinic-c"]
    )
    for service in services.values():
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
        assert service["user"] != "0:0"
    secret_dir = tmp_path / "c" / "secrets" / "flame-clinic-a"
    assert _mode(secret_dir) == 0o500
    assert {p.name: _mode(p) for p in secret_dir.iterdir()} == {
        "identity.key": 0o400,
        "broker.token": 0o400,
    }
    env = services["flame-clinic-a"]["environment"]
    assert env["FLAME_APPROVED_CODE"] == analysis_code_hash(analysis)


def test_deploy_refuses_without_approved_code_or_with_clashing_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kit = init_federation(tmp_path / "fed", ["a", "b"])
    code = main(["deploy", "kube", "--federation", str(kit.root), "--image", "i",
                 "--out", str(tmp_path / "o")])  # fmt: skip
    assert code == 2 and "no approved code" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    clash = init_federation(tmp_path / "fed2", ["site.a", "site_a"])
    with pytest.raises(ConfigError, match="clashing Kubernetes names"):
        DeploySpec(clash, "i", "0" * 64)
    with pytest.raises(ConfigError, match="not a SHA-256"):
        DeploySpec(kit, "i", "abc")
    with pytest.raises(ConfigError, match="not a federation kit"):
        Kit.load(tmp_path)
    facts = json.loads((kit.root / "federation.json").read_text())
    (kit.root / "federation.json").write_text(json.dumps({**facts, "nodes": ["a", "../x"]}))
    with pytest.raises(ConfigError, match="are not the roster's"):
        Kit.load(kit.root)


# ------------------------------------------------------------------------ the YAML emitter

_text = st.text(max_size=30)
_scalars = st.one_of(st.none(), st.booleans(), st.integers(), _text)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_text, inner, max_size=4)),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(_values)
def test_the_emitter_round_trips_through_a_yaml_parser(value: Any) -> None:
    assert yaml.safe_load(dump(value)) == value


@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20),
                min_size=2, max_size=5))  # fmt: skip
def test_file_text_round_trips(lines: list[str]) -> None:
    text = "\n".join(lines) + "\n"
    assert yaml.safe_load(dump({"file": text, "list": [text]})) == {"file": text, "list": [text]}


def test_file_text_is_written_as_a_block() -> None:
    assert dump({"acl": "user a\ntopic read x\n"}) == "acl: |\n  user a\n  topic read x\n"
    assert dump({"v": "true", "mode": "0400", "p": "/run/x", "n": 1}) == (
        'v: "true"\nmode: "0400"\np: /run/x\n"n": 1\n'
    )


def test_deploy_from_files_made_by_hand(tmp_path: Path, analysis: Path) -> None:
    """The by-hand steps of the production tutorial, then `flame deploy kube --roster ...`."""
    from flame.protocols.paillier.threshold import generate_threshold_key
    from flame.protocols.paillier.threshold_files import write_threshold_key

    keys, roster, broker = tmp_path / "keys", tmp_path / "roster.toml", tmp_path / "broker"
    for node, role in (("agg", "aggregation"), ("a", "analysis"), ("b", "analysis")):
        assert main(["keys", "identity", node, "--out", str(keys)]) == 0
        assert main(["roster", "add", str(roster), node, "--role", role,
                     "--public-key", str(keys / f"{node}.pub")]) == 0  # fmt: skip
    assert main(["broker", "config", "--roster", str(roster), "--out", str(broker)]) == 0
    public, shares = generate_threshold_key(512, 2, ["a", "b"])
    write_threshold_key(tmp_path / "tkeys", public, shares)
    out = tmp_path / "k"
    args = ["deploy", "kube", "--roster", str(roster), "--keys", str(keys), "--broker",
            str(broker), "--threshold-keys", str(tmp_path / "tkeys"), "--analysis-id", "s-9",
            "--image", "i:1", "--approve", str(analysis), "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    documents = list(yaml.safe_load_all((out / "federation.yaml").read_text()))
    secrets = {d["metadata"]["name"]: _decoded(d) for d in documents if d["kind"] == "Secret"}
    assert secrets["flame-agg-secret"]["identity.key"] == (keys / "agg.key").read_text()
    assert json.loads(secrets["flame-b-secret"]["share.json"])["node"] == "b"
    settings_map = next(d for d in documents if d["metadata"]["name"] == "flame-settings")
    assert settings_map["data"]["FLAME_ANALYSIS_ID"] == "s-9"
    assert settings_map["data"]["FLAME_PARTICIPANTS"] == "a,b"
    (keys / "b.key").unlink()
    assert main([*args[:-1], str(tmp_path / "k2")]) == 2  # names the missing file
    assert not (tmp_path / "k2").exists()
