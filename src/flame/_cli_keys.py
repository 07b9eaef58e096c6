"""``flame keys``: make and inspect Paillier key files (the CLI side of protocols.paillier)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from flame.protocols.paillier import (
    MIN_KEY_BITS,
    KeyFileError,
    SecureAggregationError,
    key_id,
    load_private_key,
    load_public_key,
    write_keypair,
)

__all__ = ["keys_cli"]


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
            public_path, private_path = write_keypair(args.out, args.bits, overwrite=args.force)
            print(f"public key:  {public_path}")
            print(f"private key: {private_path}")
            return 0
        try:
            public_key = load_public_key(args.path, allow_insecure=True)
            kind = "public"
        except KeyFileError:
            public_key = load_private_key(args.path, allow_insecure=True).public_key
            kind = "private"
        print(
            f"{args.path}: {kind} key, {int(public_key.n).bit_length()} bits, "
            f"key id {key_id(public_key)}"
        )
        return 0
    except SecureAggregationError as exc:
        print(f"flame keys: {exc}", file=sys.stderr)
        return 1
