"""``flame keys``: make and inspect Paillier key files (the CLI side of protocols.paillier)."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from flame.errors import ConfigError
from flame.protocols.paillier import (
    MIN_KEY_BITS,
    KeyFileError,
    SecureAggregationError,
    key_id,
    load_private_key,
    load_public_key,
    write_keypair,
)
from flame.protocols.paillier.threshold import generate_threshold_key
from flame.protocols.paillier.threshold_files import load_threshold_public_key, write_threshold_key

__all__ = ["keys_cli", "roster_share_holders"]


def roster_share_holders(path: Path) -> list[str]:
    """The analysis nodes of a roster, in share-index order (key_share if given, else by id)."""
    from flame.identity.roster import Roster

    members = [m for m in Roster.load(path) if m.role == "analysis"]
    if not members:
        raise ConfigError(f"{path}: the roster lists no analysis nodes")
    given = [m.key_share for m in members if m.key_share is not None]
    if given and sorted(given) != list(range(1, len(members) + 1)):
        raise ConfigError(
            f"{path}: key_share values must be 1..{len(members)}, one per analysis node"
        )
    if given and len(given) != len(members):
        raise ConfigError(f"{path}: give key_share for every analysis node or for none")
    ordered = sorted(members, key=lambda m: (m.key_share or 0, m.node_id))
    return [m.node_id for m in ordered]


def _generate_threshold(args: argparse.Namespace) -> int:
    """Deal a threshold key to the roster's analysis nodes; this process keeps nothing."""
    if args.threshold is None or args.roster is None:
        print("flame keys: --threshold and --roster go together", file=sys.stderr)
        return 2
    members = roster_share_holders(args.roster)
    if not 1 <= args.threshold <= len(members):
        print(
            f"flame keys: --threshold {args.threshold} must be between 1 and the number of "
            f"analysis nodes in the roster ({len(members)})",
            file=sys.stderr,
        )
        return 2
    # Any T are fine: the endorsement quorum Q = ceil((n + T) / 2) keeps two groups of holders
    # from decrypting two different sums (--allow-disjoint-quorums is no longer needed).
    quorum = math.ceil((len(members) + args.threshold) / 2)
    if args.threshold == 1:
        print("flame keys: warning: --threshold 1 lets any one node decrypt alone", file=sys.stderr)

    def progress(line: str) -> None:
        print(f"flame keys: {line}", file=sys.stderr, flush=True)

    progress(
        f"generating a {args.bits}-bit threshold key for {len(members)} nodes "
        f"(safe primes; this can take a minute)"
    )
    public, shares = generate_threshold_key(args.bits, args.threshold, members, progress)
    public_path, share_paths = write_threshold_key(args.out, public, shares, overwrite=args.force)
    del shares
    print(
        f"public key:  {public_path}  (key id {public.key_id}; T = {args.threshold}: any "
        f"{args.threshold} of the {len(members)} shares decrypt, once Q = {quorum} holders "
        "have endorsed the contribution set)"
    )
    for node, path in zip(members, share_paths, strict=True):
        print(f"share for {node}: {path}  (mode 0600: give it to {node} only)")
    print("the primes and the shares are not kept by this process; nothing else was written")
    return 0


def keys_cli(argv: Sequence[str] | None = None) -> int:
    """``flame keys generate --bits N --out DIR`` and ``flame keys info FILE``.

    Prints paths and public facts only; a private key never reaches the terminal.
    """
    parser = argparse.ArgumentParser(prog="flame keys", description="Paillier keys for flame.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gen = commands.add_parser(
        "generate", help="write public_key.json and private_key.json (mode 0600) to a folder"
    )
    gen.add_argument("--bits", type=int, default=MIN_KEY_BITS, help="modulus size (2048, 3072)")
    gen.add_argument("--out", type=Path, default=Path("."), help="output folder (default: .)")
    gen.add_argument("--force", action="store_true", help="replace existing key files")
    gen.add_argument(
        "--threshold",
        type=int,
        metavar="T",
        help="threshold key: one share per analysis node of --roster, any T of them decrypt",
    )
    gen.add_argument("--roster", type=Path, help="the federation roster (with --threshold)")
    gen.add_argument(  # accepted so that old scripts keep working; no longer needed
        "--allow-disjoint-quorums", action="store_true", help=argparse.SUPPRESS
    )
    info = commands.add_parser("info", help="print the key id and size of a key file")
    info.add_argument("path", type=Path)
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    try:
        if args.command == "generate":
            if args.bits < MIN_KEY_BITS:
                print(
                    f"flame keys: --bits {args.bits} is too small; use {MIN_KEY_BITS} or more "
                    "(3072 for data that must stay confidential beyond 2030)",
                    file=sys.stderr,
                )
                return 2
            if args.threshold is not None or args.roster is not None:
                return _generate_threshold(args)
            public_path, private_path = write_keypair(args.out, args.bits, overwrite=args.force)
            print(f"public key:  {public_path}")
            print(f"private key: {private_path}")
            return 0
        try:
            public_key = load_public_key(args.path, allow_insecure=True)
            kind = "public"
            try:
                t_key = load_threshold_public_key(args.path, allow_insecure=True)
                quorum = math.ceil((t_key.parties + t_key.threshold) / 2)
                kind = (
                    f"threshold public ({t_key.threshold} of {t_key.parties}; endorsement "
                    f"quorum Q = {quorum})"
                )
            except KeyFileError:
                pass
        except KeyFileError:
            public_key = load_private_key(args.path, allow_insecure=True).public_key
            kind = "private"
        print(
            f"{args.path}: {kind} key, {int(public_key.n).bit_length()} bits, "
            f"key id {key_id(public_key)}"
        )
        return 0
    except (SecureAggregationError, ConfigError) as exc:
        print(f"flame keys: {exc}", file=sys.stderr)
        return 1
