"""Typed configuration: `FLAME_*` environment variables and/or a config file (`FLAME_CONFIG`).

Priority, highest first: explicit arguments (CLI flags), environment, config file, defaults.
Nested sections use a double underscore in the environment: `FLAME_BROKER__URL`.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from flame.errors import ConfigError
from flame.utils.redact import file_secret, url_password
from flame.utils.settings_errors import format_validation_error as _format_errors

__all__ = [
    "BrokerSettings",
    "DataSourceSettings",
    "FlameConfig",
    "IdentitySettings",
    "SecureAggregationSettings",
    "StorageSettings",
    "TokenSettings",
    "load_config",
    "require_node_settings",
]

Role = Literal["analysis", "aggregation"]
ENV_PREFIX = "FLAME_"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TokenSettings(_Section):
    """Where a service's token comes from: inline (env) or a mounted file (re-read on change)."""

    token: SecretStr | None = Field(None, description="the token or password, inline")
    token_file: Path | None = Field(
        None, description="a file holding the token; re-read when it changes (secret rotation)"
    )
    issuer: str | None = Field(None, description="JWT: the issuer (iss) it must carry")
    audience: str | None = Field(None, description="JWT: the audience (aud) it must carry")
    jwks_url: str | None = Field(
        None, description="JWT: https:// JWKS URL to check signatures (http only on loopback)"
    )
    verify_key_file: Path | None = Field(None, description="PEM public key to check signatures")
    verify: bool = Field(True, description="check the token's expiry (and signature if keys given)")


class BrokerSettings(TokenSettings):
    """The MQTT broker. `url=None` means the in-process memory transport (simulation)."""

    url: str | None = Field(None, description="mqtt://host:1883 or mqtts://host:8883")
    username: str | None = Field(
        None, description="broker user (default: the node id; ACLs key on it)"
    )
    ca_file: Path | None = Field(None, description="TLS: CA certificate(s) to trust")
    cert_file: Path | None = Field(None, description="TLS: client certificate (optional)")
    key_file: Path | None = Field(None, description="TLS: the client certificate's key")
    keepalive: int = Field(30, ge=5, le=3600, description="MQTT keepalive, seconds")
    session_expiry: int = Field(
        3600, ge=0, description="seconds the broker keeps this node's session while away"
    )
    chunk_size: int = Field(1024 * 1024, ge=1024, description="payloads above this are split")
    max_message_bytes: int = Field(
        512 * 1024 * 1024, ge=1024, description="largest message accepted (after reassembly)"
    )
    connect_timeout: float = Field(10.0, gt=0, description="seconds to connect to the broker")
    send_timeout: float = Field(
        30.0, gt=0, description="seconds a small message may wait for the broker's PUBACK"
    )
    min_send_rate: int = Field(
        16 * 1024,
        ge=256,
        description="bytes/s a link is assumed to carry at least: a message's wait for its "
        "PUBACK is send_timeout + size / min_send_rate (a slow uplink is not a lost one)",
    )


class DataSourceSettings(TokenSettings):
    """One data source of this node."""

    name: str = Field("default", description="data.source(name) finds it by this")
    kind: Literal["local", "http", "fhir", "s3", "sql"] = Field("local", description="source type")
    url: str | None = Field(
        None, description="base URL (http, fhir), S3 endpoint or postgresql:// URL (sql)"
    )
    path: Path | None = Field(None, description="directory for kind=local")
    bucket: str | None = Field(None, description="s3: the bucket")
    prefix: str = Field("", description="s3: only objects under this prefix")
    access_key: str | None = Field(None, description="s3: access key")
    secret_key: SecretStr | None = Field(None, description="s3: secret key")
    timeout: float = Field(30.0, gt=0, description="seconds per request")
    encoding: str | None = Field(
        None,
        description="text encoding of CSV files without a byte-order mark (default utf-8; "
        "e.g. cp1252, latin-1, utf-16)",
    )
    retries: int = Field(
        3, ge=0, le=20, description="retries of connection errors, 429 and 5xx (with backoff)"
    )
    statement_timeout: float = Field(300.0, gt=0, description="seconds per SQL statement")
    allow_privileged_role: bool = Field(
        False,
        description="sql: connect even as a superuser or a member of pg_read_server_files etc.",
    )


class StorageSettings(TokenSettings):
    """Result and checkpoint storage (MinIO / S3). `endpoint=None` disables it."""

    endpoint: str | None = Field(None, description="host:port of MinIO / S3")
    bucket: str = Field("flame", description="bucket for checkpoints, results, node state")
    prefix: str = Field("", description="object-name prefix inside the bucket")
    access_key: str | None = Field(None, description="S3 access key")
    secret_key: SecretStr | None = Field(None, description="S3 secret key")
    secure: bool = Field(True, description="HTTPS to the endpoint")
    region: str | None = Field(None, description="S3 region, if the server wants one")
    timeout: float = Field(30.0, gt=0, description="seconds per request")
    results_dir: Path | None = Field(None, description="local folder for results (simulation)")
    min_free_mb: float = Field(
        64.0,
        ge=0,
        description="space a results folder must be able to take at start-up (checkpoints and "
        "the result); checked by a real reservation, so a full disk stops the node at once",
    )
    retry_s: float = Field(
        120.0, ge=0, description="seconds a failing checkpoint or result write is retried"
    )
    claim_check: bool = Field(
        False, description="send large messages through this (shared) store instead of chunks"
    )


class SecureAggregationSettings(_Section):
    """Paillier-encrypted sums. The aggregator gets the public key only."""

    enabled: bool = Field(False, description="sum flame.secure(...) fields under Paillier")
    scheme: Literal["paillier", "masking"] = Field(
        "paillier", description="'masking': pairwise masks, no keys (docs: explanation/masking)"
    )
    masking_threshold: int | None = Field(
        None, ge=1, description="masking: nodes to finish a sum (default floor(2n/3)+1 of n)"
    )
    public_key_file: Path | None = Field(
        None, description="public_key.json (every node; the aggregator holds only this)"
    )
    private_key_file: Path | None = Field(
        None, description="single-key mode, analysis nodes: private_key.json (mode 0600)"
    )
    precision: int = Field(16, ge=0, le=52, description="fractional bits of fixed-point values")
    bound: float = Field(2.0**15, gt=0, description="declared maximum |value| of one node")
    max_nodes: int = Field(100, ge=1, description="most contributions a sum leaves room for")
    min_contributors: int = Field(2, ge=1, description="fewest nodes a decrypted sum may hold")
    confirm_fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description="share of the reported sum each other node re-decrypts to confirm it "
        "(default: enough for every ciphertext to be checked 3 times on average)",
    )
    obfuscation: Literal["standard", "djn"] = Field(
        "standard", description="'djn' is faster but rests on an extra assumption (docs)"
    )
    key_share_file: Path | None = Field(
        None, description="threshold mode: this analysis node's share-<node>.json (mode 0600)"
    )
    decrypters: int | None = Field(
        None,
        ge=1,
        description="threshold mode: share holders asked to decrypt at first (default: all); "
        "more are asked when one refuses, cheats or is slow",
    )
    precompute: int = Field(
        0,
        ge=0,
        le=10_000_000,
        description="threshold mode: encryption obfuscators (one per ciphertext) to make "
        "while the node waits for its first epoch; later epochs refill what the last used",
    )
    allow_changing_contributors: bool = Field(
        False,
        description="decrypt sums of a field over changing contributor sets (both key modes) "
        "(off: the first sum fixes the set, so sums cannot be differenced)",
    )


class IdentitySettings(_Section):
    """This node's Ed25519 signing key (`flame keys identity NODE --out DIR` writes one)."""

    key_file: Path | None = Field(
        None, description="this node's Ed25519 key, PEM (flame keys identity; mode 0600)"
    )


def _split_list(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


class FlameConfig(BaseSettings):
    """Everything a node (or a simulation) needs to know before it starts."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        validate_default=True,
    )

    analysis_id: str = Field(
        "local",
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="the analysis (scopes topics and storage)",
    )
    node_id: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="this node's id (node runs)",
    )
    role: Role | None = Field(None, description="this node's role (node runs)")
    participants: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="the analysis nodes' ids: a,b,c or a JSON list"
    )
    aggregator_id: str = Field(
        "aggregator", pattern=r"^[A-Za-z0-9._-]+$", description="the aggregation node's id"
    )
    epochs: int = Field(1, ge=1, le=100_000, description="maximum number of epochs")
    epoch_timeout: float = Field(
        600.0,
        gt=0,
        description="seconds the aggregator waits for an epoch's results (and a decryption round)",
    )
    presence_timeout: float = Field(
        300.0, gt=0, description="seconds to wait for nodes to come online"
    )
    quorum: int | None = Field(
        None, ge=1, description="results needed to proceed when a deadline passes (default: all)"
    )
    resend_interval: float = Field(
        10.0,
        gt=0,
        description="seconds before an unacknowledged result is re-sent (doubling up to 120)",
    )
    seed: int | None = Field(None, description="seed for context().rng")
    data_dir: Path | None = Field(None, description="a local folder as this node's data")
    data: list[DataSourceSettings] = Field(
        default_factory=list, description="data sources: a JSON list of source objects"
    )
    params: dict[str, Any] = Field(
        default_factory=dict, description="run parameters (JSON) -> flame.context().params"
    )
    broker: BrokerSettings = BrokerSettings()
    storage: StorageSettings = StorageSettings()
    secure: SecureAggregationSettings = SecureAggregationSettings()
    roster: Path | None = Field(
        None, description="the federation roster (TOML); required by flame run"
    )
    identity: IdentitySettings = IdentitySettings()
    allow_unsigned: bool = Field(
        False, description="run without roster and signatures: nothing is authenticated"
    )
    approved_code: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="SHA-256s (flame hash) of analysis code this node may run, comma-separated",
    )
    policy: Path | None = Field(
        None, description="this node's policy file (disclosure rules, DP budget); operator's"
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="json: JSON lines with analysis_id, node_id, epoch (the image's default)",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")

    @field_validator("participants", mode="before")
    @classmethod
    def _participants_list(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("approved_code", mode="before")
    @classmethod
    def _approved_list(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("approved_code")
    @classmethod
    def _approved_hashes(cls, value: list[str]) -> list[str]:
        value = [item.strip().lower() for item in value]
        for item in value:
            if not re.fullmatch(r"[0-9a-f]{64}", item):
                raise ValueError(
                    f"{item[:70]!r} is not a SHA-256 in hex (64 characters; `flame hash` prints it)"
                )
        return value

    @field_validator("participants")
    @classmethod
    def _participants_unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("participants must be unique")
        for node in value:
            if not node or not all(c.isalnum() or c in "._-" for c in node):
                raise ValueError(
                    f"participant {node!r} may use only letters, digits, '.', '_', '-'"
                )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> FlameConfig:
        if self.quorum is not None and self.participants and self.quorum > len(self.participants):
            raise ValueError(
                f"quorum: {self.quorum} is larger than the {len(self.participants)} participants"
            )
        if self.aggregator_id in self.participants:
            raise ValueError(
                f"aggregator_id: {self.aggregator_id!r} is also listed as a participant"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _FileSource(settings_cls))

    def effective_quorum(self) -> int:
        return self.quorum if self.quorum is not None else len(self.participants)

    def secrets(self) -> list[str]:
        """Every secret value this config holds, so logs can redact them."""
        found: list[str] = []

        def walk(value: Any) -> None:
            if isinstance(value, SecretStr):
                secret = value.get_secret_value()
                if secret:
                    found.append(secret)
            elif isinstance(value, BaseModel):
                if isinstance(value, TokenSettings) and value.token_file is not None:
                    found.append(file_secret(value.token_file))  # the mounted token, as it is
                for name in type(value).model_fields:
                    walk(getattr(value, name))
            elif isinstance(value, list):
                for item in value:
                    walk(item)

        walk(self)
        found.extend(p for p in (url_password(s.url) for s in self.data) if p)
        return [secret for secret in found if secret]  # an unreadable token file gives ""

    def public_dict(self) -> dict[str, Any]:
        """The config as JSON-ready data with secrets masked (for manifests and `flame check`)."""
        public: dict[str, Any] = json.loads(self.model_dump_json())
        for entry in public.get("data", []):  # a password inside a source URL (postgresql://)
            password = url_password(entry.get("url"))
            if password:
                entry["url"] = entry["url"].replace(f":{password}@", ":**********@", 1)
        return public


class _FileSource(PydanticBaseSettingsSource):
    """Reads the file named by FLAME_CONFIG (TOML, YAML or JSON)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path_text = os.environ.get(f"{ENV_PREFIX}CONFIG")
        return read_config_file(Path(path_text)) if path_text else {}


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse a TOML / YAML / JSON config file into a dict, with errors naming the file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"FLAME_CONFIG: cannot read {path}: {exc.strerror}") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover
                import tomli as tomllib
            data: Any = tomllib.loads(raw.decode())
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ConfigError(
                    f"FLAME_CONFIG: {path} is YAML; install PyYAML (pip install 'flame[yaml]')"
                ) from None
            data = yaml.safe_load(raw)
        elif suffix == ".json":
            data = json.loads(raw)
        else:
            raise ConfigError(f"FLAME_CONFIG: {path} must end in .toml, .yaml, .yml or .json")
    except ConfigError:
        raise
    except Exception as exc:  # the parsers raise many types; all mean "not valid syntax"
        raise ConfigError(f"FLAME_CONFIG: {path} is not valid {suffix[1:]}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"FLAME_CONFIG: {path} must hold a table/mapping at the top level")
    return data


def format_validation_error(exc: ValidationError) -> str:
    """One line per wrong setting, naming its FLAME_* variable and what was expected."""
    return _format_errors(exc, FlameConfig)


def load_config(**overrides: Any) -> FlameConfig:
    """Build the config; `overrides` (from CLI flags) win over environment and file."""
    try:
        return FlameConfig(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"a FLAME_* variable holds invalid JSON: {exc.msg}") from None
    except SettingsError as exc:  # a section variable (FLAME_BROKER, FLAME_DATA) is not JSON
        found = re.search(r'field "([a-z_]+)"', str(exc))
        field = found.group(1) if found else "?"
        raise ConfigError(
            f"{ENV_PREFIX}{field.upper()} / {field}: must be JSON (an object or a list)"
        ) from None


def require_node_settings(config: FlameConfig) -> tuple[str, str]:
    """(node id, role) of a node run, or one ConfigError naming every missing setting.

    Shared by `flame run` and `flame check`, so both refuse the same configs."""
    problems = []
    if config.node_id is None:
        problems.append("FLAME_NODE_ID / node_id: required for a node run (this node's id)")
    if config.role is None:
        problems.append("FLAME_ROLE / role: required for a node run ('analysis' or 'aggregation')")
    if not config.participants:
        problems.append("FLAME_PARTICIPANTS / participants: required (the analysis nodes' ids)")
    if config.broker.url is None:
        problems.append(
            "FLAME_BROKER__URL / broker.url: required for a node run (mqtt://host:1883)"
        )
    if config.role == "analysis" and config.node_id not in config.participants:
        problems.append(
            f"FLAME_NODE_ID / node_id: {config.node_id!r} is not one of the participants"
        )
    if problems:
        raise ConfigError("\n".join(problems))
    assert config.node_id is not None and config.role is not None
    return config.node_id, config.role
