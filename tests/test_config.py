"""Configuration: FLAME_* environment, config files, priority, and clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from flame.config import FlameConfig, load_config
from flame.errors import ConfigError

SECRET = "s3cr3t-T0ken-value-9f8e7d"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Each test starts without any FLAME_* variable of the outer environment."""
    for name in list(os.environ):
        if name.upper().startswith("FLAME_"):
            monkeypatch.delenv(name)
    return monkeypatch


def error_text(**overrides: object) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(**overrides)
    return str(caught.value)


def lines_about(text: str, variable: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(variable + " ")]


# --- defaults and environment ----------------------------------------------------------------


def test_defaults_without_environment() -> None:
    config = load_config()
    assert config.analysis_id == "local"
    assert config.epochs == 1
    assert config.participants == []
    assert config.quorum is None
    assert config.effective_quorum() == 0
    assert config.broker.url is None
    assert config.secrets() == []


def test_scalar_variables(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("FLAME_ANALYSIS_ID", "study-42")
    clean_env.setenv("FLAME_NODE_ID", "clinic_a")
    clean_env.setenv("FLAME_ROLE", "analysis")
    clean_env.setenv("FLAME_EPOCHS", "12")
    clean_env.setenv("FLAME_EPOCH_TIMEOUT", "2.5")
    clean_env.setenv("FLAME_SEED", "-3")
    config = load_config()
    assert (config.analysis_id, config.node_id, config.role) == ("study-42", "clinic_a", "analysis")
    assert config.epochs == 12
    assert config.epoch_timeout == 2.5
    assert config.seed == -3


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a,b,c", ["a", "b", "c"]),
        (" a , b ,c ", ["a", "b", "c"]),
        ("single", ["single"]),
        ('["x.1", "y-2", "z_3"]', ["x.1", "y-2", "z_3"]),
        ('  ["a"]', ["a"]),
    ],
)
def test_participants_as_list_or_json(
    clean_env: pytest.MonkeyPatch, text: str, expected: list[str]
) -> None:
    clean_env.setenv("FLAME_PARTICIPANTS", text)
    config = load_config()
    assert config.participants == expected
    assert config.effective_quorum() == len(expected)


@pytest.mark.parametrize("text", ["a,a", '["a", "a"]', "a,b c", "[1, 2]", '["a"', "a/b"])
def test_bad_participants(clean_env: pytest.MonkeyPatch, text: str) -> None:
    clean_env.setenv("FLAME_PARTICIPANTS", text)
    message = error_text()
    assert "FLAME_PARTICIPANTS" in message


def test_nested_variables(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("FLAME_BROKER__URL", "mqtt://broker:1883")
    clean_env.setenv("FLAME_BROKER__KEEPALIVE", "45")
    clean_env.setenv("FLAME_STORAGE__BUCKET", "results")
    clean_env.setenv("FLAME_SECURE__ENABLED", "true")
    config = load_config()
    assert config.broker.url == "mqtt://broker:1883"
    assert config.broker.keepalive == 45
    assert config.storage.bucket == "results"
    assert config.secure.enabled is True


def test_config_is_frozen() -> None:
    config = load_config()
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen error
        config.epochs = 5  # type: ignore[misc]


# --- config files ----------------------------------------------------------------------------

FILE_VALUES = {
    "analysis_id": "from-file",
    "epochs": 4,
    "participants": ["n1", "n2", "n3"],
    "quorum": 2,
    "broker": {"url": "mqtt://file-broker:1883", "keepalive": 60},
}


def write_config(path: Path) -> Path:
    suffix = path.suffix
    if suffix == ".json":
        path.write_text(json.dumps(FILE_VALUES))
    elif suffix in (".yaml", ".yml"):
        yaml = pytest.importorskip("yaml")
        path.write_text(yaml.safe_dump(FILE_VALUES))
    else:
        path.write_text(
            'analysis_id = "from-file"\nepochs = 4\nparticipants = ["n1", "n2", "n3"]\n'
            'quorum = 2\n[broker]\nurl = "mqtt://file-broker:1883"\nkeepalive = 60\n'
        )
    return path


@pytest.mark.parametrize("name", ["flame.toml", "flame.yaml", "flame.yml", "flame.json"])
def test_config_file_formats(clean_env: pytest.MonkeyPatch, tmp_path: Path, name: str) -> None:
    clean_env.setenv("FLAME_CONFIG", str(write_config(tmp_path / name)))
    config = load_config()
    assert config.analysis_id == FILE_VALUES["analysis_id"]
    assert config.epochs == FILE_VALUES["epochs"]
    assert config.participants == FILE_VALUES["participants"]
    assert config.quorum == 2
    assert config.broker.url == "mqtt://file-broker:1883"
    assert config.broker.keepalive == 60


def test_priority_explicit_over_env_over_file(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    clean_env.setenv("FLAME_CONFIG", str(write_config(tmp_path / "c.toml")))
    clean_env.setenv("FLAME_EPOCHS", "7")
    clean_env.setenv("FLAME_BROKER__KEEPALIVE", "90")
    config = load_config()
    assert config.epochs == 7  # env beats file
    assert config.analysis_id == "from-file"  # file beats default
    assert config.broker.keepalive == 90  # nested env beats file ...
    assert config.broker.url == "mqtt://file-broker:1883"  # ... without losing the file's url
    config = load_config(epochs=9, seed=None)
    assert config.epochs == 9  # explicit beats env; None means "not given"
    assert load_config(analysis_id="explicit").analysis_id == "explicit"


def test_env_list_beats_file_list(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("FLAME_CONFIG", str(write_config(tmp_path / "c.json")))
    clean_env.setenv("FLAME_PARTICIPANTS", "p,q")
    clean_env.setenv("FLAME_QUORUM", "1")
    config = load_config()
    assert config.participants == ["p", "q"]


def test_unknown_key_in_file_is_refused(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"epochs": 2, "epoch": 3, "broker": {"ulr": "mqtt://x"}}))
    clean_env.setenv("FLAME_CONFIG", str(path))
    message = error_text()
    assert lines_about(message, "FLAME_EPOCH")
    assert lines_about(message, "FLAME_BROKER__ULR")
    assert len(message.splitlines()) == 2


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("c.toml", "epochs = = 3", "not valid toml"),
        ("c.json", "{bad json", "not valid json"),
        ("c.yaml", "a: [unclosed", "not valid yaml"),
        ("c.json", "[1, 2]", "mapping"),
        ("c.ini", "epochs=3", ".toml"),
    ],
)
def test_bad_config_files(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, name: str, content: str, fragment: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    clean_env.setenv("FLAME_CONFIG", str(path))
    message = error_text()
    assert "FLAME_CONFIG" in message and str(path) in message and fragment in message


def test_missing_config_file(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("FLAME_CONFIG", str(tmp_path / "nope.toml"))
    message = error_text()
    assert "FLAME_CONFIG" in message and "nope.toml" in message


def test_empty_yaml_file_means_defaults(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("yaml")
    path = tmp_path / "empty.yaml"
    path.write_text("")
    clean_env.setenv("FLAME_CONFIG", str(path))
    assert load_config().epochs == 1


def test_wrong_type_in_file_names_the_variable(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "c.toml"
    path.write_text('epochs = "many"\n[broker]\nkeepalive = "often"\n')
    clean_env.setenv("FLAME_CONFIG", str(path))
    message = error_text()
    assert len(lines_about(message, "FLAME_EPOCHS")) == 1
    assert len(lines_about(message, "FLAME_BROKER__KEEPALIVE")) == 1


# --- errors ----------------------------------------------------------------------------------


def test_one_line_per_wrong_field(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("FLAME_EPOCHS", "abc")
    clean_env.setenv("FLAME_EPOCH_TIMEOUT", "-1")
    clean_env.setenv("FLAME_ROLE", "boss")
    clean_env.setenv("FLAME_BROKER__KEEPALIVE", "1")
    clean_env.setenv("FLAME_NODE_ID", "has space")
    clean_env.setenv("FLAME_ANALYSIS_ID", "fine")
    message = error_text()
    lines = message.splitlines()
    assert len(lines) == 5, message
    for variable in (
        "FLAME_EPOCHS",
        "FLAME_EPOCH_TIMEOUT",
        "FLAME_ROLE",
        "FLAME_BROKER__KEEPALIVE",
        "FLAME_NODE_ID",
    ):
        assert len(lines_about(message, variable)) == 1, (variable, message)
    assert "abc" in lines_about(message, "FLAME_EPOCHS")[0]
    assert "integer" in lines_about(message, "FLAME_EPOCHS")[0]
    assert "FLAME_ANALYSIS_ID" not in message


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("FLAME_EPOCHS", "0"),
        ("FLAME_EPOCHS", "1.5"),
        ("FLAME_QUORUM", "0"),
        ("FLAME_LOG_LEVEL", "LOUD"),
        ("FLAME_LOG_FORMAT", "xml"),
        ("FLAME_PRESENCE_TIMEOUT", "0"),
        ("FLAME_SECURE__PRECISION", "99"),
        ("FLAME_AGGREGATOR_ID", "a b"),
    ],
)
def test_invalid_values_name_their_variable(
    clean_env: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    clean_env.setenv(variable, value)
    message = error_text()
    assert len(lines_about(message, variable)) == 1, message


def test_explicit_override_errors_are_reported_too() -> None:
    message = error_text(epochs="abc")
    assert len(lines_about(message, "FLAME_EPOCHS")) == 1


def test_quorum_larger_than_participants_is_refused(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("FLAME_PARTICIPANTS", "a,b")
    clean_env.setenv("FLAME_QUORUM", "3")
    message = error_text()
    assert "quorum" in message.lower() and "3" in message
    clean_env.setenv("FLAME_QUORUM", "2")
    assert load_config().effective_quorum() == 2


def test_quorum_error_names_the_variable(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("FLAME_PARTICIPANTS", "a,b")
    clean_env.setenv("FLAME_QUORUM", "3")
    assert "FLAME_QUORUM" in error_text()


def test_aggregator_may_not_be_a_participant(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("FLAME_PARTICIPANTS", "a,hub")
    clean_env.setenv("FLAME_AGGREGATOR_ID", "hub")
    assert "hub" in error_text()


@pytest.mark.parametrize(("variable", "value"), [("FLAME_BROKER", "{bad"), ("FLAME_DATA", "x")])
def test_malformed_json_section_is_a_config_error(
    clean_env: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    clean_env.setenv(variable, value)
    assert variable in error_text()


# --- secrets ---------------------------------------------------------------------------------


def test_secret_is_masked_in_public_dict_and_repr(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("FLAME_BROKER__TOKEN", SECRET)
    clean_env.setenv("FLAME_STORAGE__SECRET_KEY", SECRET + "-storage")
    config = load_config()
    assert config.broker.token is not None
    assert config.broker.token.get_secret_value() == SECRET
    public = json.dumps(config.public_dict())
    assert SECRET not in public
    assert SECRET not in repr(config) and SECRET not in str(config)
    assert sorted(config.secrets()) == sorted([SECRET, SECRET + "-storage"])


def test_secret_never_in_field_errors(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("FLAME_BROKER__TOKEN", SECRET)
    clean_env.setenv("FLAME_BROKER__KEEPALIVE", "abc")
    clean_env.setenv("FLAME_EPOCHS", "abc")
    message = error_text()
    assert SECRET not in message
    assert SECRET[:6] not in message


def test_secret_of_wrong_type_is_not_echoed(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"broker": {"token": ["not", SECRET]}}))
    clean_env.setenv("FLAME_CONFIG", str(path))
    message = error_text()
    assert lines_about(message, "FLAME_BROKER__TOKEN")
    assert SECRET not in message


@pytest.mark.parametrize("source", ["env", "file"])
def test_secret_never_in_model_level_errors(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, source: str
) -> None:
    if source == "file":
        path = tmp_path / "c.json"
        path.write_text(
            json.dumps({"broker": {"token": SECRET}, "quorum": 2, "participants": ["a"]})
        )
        clean_env.setenv("FLAME_CONFIG", str(path))
    else:
        clean_env.setenv("FLAME_BROKER__TOKEN", SECRET)
        clean_env.setenv("FLAME_PARTICIPANTS", "aggregator")
    message = error_text()
    assert SECRET[:3] not in message.replace("aggregator", "")  # not even a prefix of it


def test_misspelt_secret_setting_is_not_echoed(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("FLAME_BROKER__TOKN", SECRET)
    message = error_text()
    assert lines_about(message, "FLAME_BROKER__TOKN")
    assert SECRET not in message


def test_flame_config_class_is_the_same_as_load_config(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("FLAME_EPOCHS", "3")
    assert FlameConfig().epochs == load_config().epochs == 3


def test_data_source_secrets_are_known_and_masked(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[[data]]\nname = "s3"\nkind = "s3"\nbucket = "b"\n'
        f'access_key = "AKIA"\nsecret_key = "{SECRET}-s3"\n'
        '[[data]]\nname = "api"\nkind = "http"\nurl = "https://x"\n'
        f'token = "{SECRET}-http"\n'
    )
    clean_env.setenv("FLAME_CONFIG", str(path))
    config = load_config()
    assert [d.name for d in config.data] == ["s3", "api"]
    assert sorted(config.secrets()) == sorted([f"{SECRET}-s3", f"{SECRET}-http"])
    assert SECRET not in json.dumps(config.public_dict())


def test_data_source_secret_of_wrong_type_is_not_echoed(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"data": [{"kind": "s3", "secret_key": {"v": SECRET}}]}))
    clean_env.setenv("FLAME_CONFIG", str(path))
    message = error_text()
    assert lines_about(message, "FLAME_DATA__0__SECRET_KEY")
    assert SECRET not in message
