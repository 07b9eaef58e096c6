"""Federation set-up commands: identities, the roster, code hashes, broker config. They print."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flame.errors import ConfigError

EXIT_OK = 0
EXIT_USAGE = 2


def keys_identity(argv: Sequence[str]) -> int:
    """`flame keys identity NODE_ID --out DIR`: an Ed25519 identity (DIR/NODE.key 0600, .pub)."""
    from flame.identity import Identity, write_identity

    parser = argparse.ArgumentParser(
        prog="flame keys identity",
        description="Write this node's signing key (NODE.key, mode 0600) and its public half "
        "(NODE.pub, the line the roster lists). Refuses to overwrite.",
    )
    parser.add_argument("node_id")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder (default: .)")
    args = parser.parse_args(list(argv))
    private, public = write_identity(Identity.generate(args.node_id), args.out)
    print(f"private key: {private}")
    print(f"public key:  {public}")
    print(f"add it: flame roster add ROSTER {args.node_id} --role ROLE --public-key {public}")
    return EXIT_OK


def _cmd_roster(args: argparse.Namespace) -> int:
    from flame.identity import Member, Roster

    path: Path = args.roster
    if args.action == "show":
        roster = Roster.load(path)
        for member in roster:
            share = f"  key share {member.key_share}" if member.key_share is not None else ""
            print(f"{member.node_id:<24} {member.role:<12} {member.public_text}{share}")
        print(f"fingerprint (SHA-256): {roster.fingerprint}")
        return EXIT_OK
    if args.node_id is None or args.role is None or args.public_key is None:
        raise ConfigError("roster add: needs NODE_ID, --role and --public-key")
    key_text = args.public_key
    key_path = Path(key_text)
    if not key_text.startswith("ed25519:") and key_path.is_file():
        key_text = key_path.read_text().strip()
    roster = Roster.load(path) if path.exists() else Roster([], str(path))
    roster = roster.with_member(Member(args.node_id, args.role, key_text, args.key_share))
    roster.save(path)
    print(f"{path}: {len(roster)} members, fingerprint (SHA-256) {roster.fingerprint}")
    return EXIT_OK


def _cmd_hash(args: argparse.Namespace) -> int:
    from flame.analysis.code_hash import analysis_code_hash
    from flame.analysis.snapshot import refuse_unreviewed

    refuse_unreviewed(args.analysis)  # what a node refuses to run is not given a hash
    print(analysis_code_hash(args.analysis))
    return EXIT_OK


def _cmd_broker(args: argparse.Namespace) -> int:
    from flame.identity import Roster
    from flame.identity.broker_config import write_broker_config

    roster = Roster.load(args.roster)
    files = write_broker_config(
        roster,
        args.out,
        analysis=args.analysis or "+",
        operators=tuple(args.operator or ()),
        persistence=args.persistence_dir,
    )
    print(f"password file: {files.passwd} (hashed by {files.tool})")
    print(f"ACL:           {files.acl}")
    print(f"config:        {files.config} (include it in mosquitto.conf)")
    print(f"tokens:        {args.out / 'tokens'}/NODE.token: give each node its own file as")
    print("               FLAME_BROKER__TOKEN_FILE (mode 0600; the broker user is the node id)")
    print(f"roster SHA-256 {roster.fingerprint}")
    return EXIT_OK


def add_commands(commands: argparse._SubParsersAction[Any]) -> None:
    """Register `roster` and `hash` on the `flame` parser."""
    roster = commands.add_parser(
        "roster",
        help="the federation roster: flame roster add|show ROSTER",
        description="A plain TOML file listing every member: id, role, public signing key "
        "(and optional key-share id). Its SHA-256 fingerprint is printed and recorded in the "
        "manifest; every node must be given the same file.",
    )
    roster.add_argument("action", choices=("add", "show"))
    roster.add_argument("roster", type=Path, help="the roster file (created by the first add)")
    roster.add_argument("node_id", nargs="?", help="add: the member's node id")
    roster.add_argument("--role", choices=("analysis", "aggregation"), help="add: its role")
    roster.add_argument(
        "--public-key", metavar="FILE|TEXT", help="add: its NODE.pub file or 'ed25519:...'"
    )
    roster.add_argument("--key-share", type=int, help="add: its secure-aggregation key-share id")
    roster.set_defaults(handler=_cmd_roster)

    broker = commands.add_parser(
        "broker",
        help="flame broker config --roster R --out DIR: Mosquitto passwords, ACL, settings",
        description="Write a Mosquitto password file and ACL for the roster's members (each "
        "reads only its own inbox, writes any inbox and its own status, reads statuses), one "
        "random broker token per member, and a config snippet with the persistence settings "
        "flame needs.",
    )
    broker.add_argument("action", choices=("config",))
    broker.add_argument("--roster", type=Path, required=True, help="the federation roster")
    broker.add_argument("--out", type=Path, required=True, help="a new or empty folder")
    broker.add_argument("--analysis", help="scope the rules to this analysis id (default: any)")
    broker.add_argument(
        "--persistence-dir",
        type=Path,
        default=Path("/var/lib/mosquitto"),
        help="where mosquitto keeps sessions and queued messages (default /var/lib/mosquitto)",
    )
    broker.add_argument(
        "--operator",
        action="append",
        metavar="USER",
        help="an extra user who may only read statuses (flame status); repeatable",
    )
    broker.set_defaults(handler=_cmd_broker)

    hashing = commands.add_parser(
        "hash",
        help="print the SHA-256 of an analysis (what FLAME_APPROVED_CODE lists)",
        description="The SHA-256 over the analysis's source files, as the manifest records it "
        "and as nodes check it against FLAME_APPROVED_CODE before touching data.",
    )
    hashing.add_argument("analysis", type=Path, help="a .py file or a folder")
    hashing.set_defaults(handler=_cmd_hash)

