"""Keys for a simulated secure run: the configured files, or throwaway ones made here.

`secure=True` (`flame simulate --secure`) uses one throwaway Paillier key pair unless key
files are configured. `secure="threshold"` or `"threshold:T"` (`--secure threshold[:T]`)
deals a throwaway threshold key in this process, one share per simulated node, so threshold
mode (endorsements, partial decryptions by any T holders) runs with one flag. The dealer
is this process: fine for trying it out, never for production, where `flame keys generate
--threshold` deals once and each node keeps only its own share.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flame.config import FlameConfig
from flame.errors import ConfigError
from flame.secure.keys import SecureKeys

__all__ = ["SecureMode", "parse_secure", "simulation_keys"]

log = logging.getLogger(__name__)

_THRESHOLD = re.compile(r"^threshold(?::(\d{1,4}))?$")


@dataclass(frozen=True)
class SecureMode:
    """How a simulation sums `flame.secure(...)` fields."""

    threshold: bool = False
    t: int | None = None  # None: a majority of the nodes


def parse_secure(value: Any) -> SecureMode | None:
    """`False`/`None`: plaintext; `True`: Paillier; `"threshold"` / `"threshold:T"`."""
    if value is None or value is False:
        return None
    if value is True:
        return SecureMode()
    if isinstance(value, str):
        match = _THRESHOLD.match(value.strip().lower())
        if match:
            t = match.group(1)
            return SecureMode(threshold=True, t=None if t is None else int(t))
    raise ConfigError(
        f"secure={value!r}: expected True, 'threshold' or 'threshold:T' "
        "(T: how many of the nodes' shares decrypt a sum)"
    )


def threshold_of(mode: SecureMode, nodes: int) -> int:
    """T for `nodes` share holders: as given (1..nodes), else a majority."""
    t = mode.t if mode.t is not None else nodes // 2 + 1
    if not 1 <= t <= nodes:
        raise ConfigError(f"--secure threshold:{t}: T must be between 1 and the {nodes} nodes")
    return t


def simulation_keys(
    config: FlameConfig, mode: SecureMode, participants: list[str], *, bits: int = 2048
) -> SecureKeys:
    """The keys of a simulated run (every node's share included, for `for_node`)."""
    if mode.threshold:
        t = threshold_of(mode, len(participants))
        return _throwaway_threshold(config, t, participants, bits)
    return _configured_or_throwaway(config)


def _throwaway_threshold(
    config: FlameConfig, t: int, participants: list[str], bits: int
) -> SecureKeys:
    settings = config.secure
    if any(
        f is not None
        for f in (settings.public_key_file, settings.private_key_file, settings.key_share_file)
    ):
        raise ConfigError(
            "--secure threshold deals throwaway shares; FLAME_SECURE__PUBLIC_KEY_FILE, "
            "PRIVATE_KEY_FILE and KEY_SHARE_FILE must not be set with it (to use dealt key "
            "files, set FLAME_SECURE__PUBLIC_KEY_FILE and give plain --secure)"
        )
    if settings.min_contributors > len(participants):
        raise ConfigError(
            f"FLAME_SECURE__MIN_CONTRIBUTORS is {settings.min_contributors}, but only "
            f"{len(participants)} nodes take part"
        )
    from flame.protocols.paillier.threshold import generate_threshold_key

    log.info(
        "secure simulation: dealing a throwaway %d-bit threshold key, %d shares, any %d decrypt",
        bits,
        len(participants),
        t,
    )
    public, shares = generate_threshold_key(bits, t, participants)
    return SecureKeys(
        public.paillier,
        None,
        SecureKeys.spec_of(settings),
        settings.min_contributors,
        settings.obfuscation,
        threshold=public,
        shares={share.node_id: share for share in shares},
        allow_changing_contributors=settings.allow_changing_contributors,
        precompute=settings.precompute,
        decrypters=settings.decrypters,
    )


def _configured_or_throwaway(config: FlameConfig) -> SecureKeys:
    """The configured keys, or a throwaway pair that lives only in this process."""
    if config.secure.private_key_file is not None:
        return SecureKeys.from_settings(config.secure, role="analysis")
    if config.secure.public_key_file is not None:
        keys = SecureKeys.from_settings(config.secure, role="aggregation")
        if keys.threshold is not None:  # every node's share-<node>.json beside the public key
            from flame.protocols.paillier.threshold_files import load_key_share, share_file_name

            folder = Path(config.secure.public_key_file).parent
            keys.shares = {
                node: load_key_share(folder / share_file_name(node), node_id=node)
                for node, _ in keys.threshold.members
            }
            return keys
    from flame.protocols.paillier import generate_keypair

    log.info("secure simulation: generating a throwaway 2048-bit key pair")
    public, private = generate_keypair(2048)
    return SecureKeys(
        public,
        private,
        SecureKeys.spec_of(config.secure),
        config.secure.min_contributors,
        config.secure.obfuscation,
        config.secure.confirm_fraction,
    )
