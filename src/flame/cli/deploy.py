"""`flame federation init` (a local federation kit) and `flame deploy compose|kube`. They print."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from flame.errors import ConfigError

EXIT_OK = 0


def _pairs(items: list[str], flag: str) -> dict[str, Path]:
    pairs: dict[str, Path] = {}
    for item in items:
        node, sep, path = item.partition("=")
        if not sep or not node or not path:
            raise ConfigError(f"{flag} {item!r}: expected NODE=DIR")
        pairs[node] = Path(path)
    return pairs


def _ids(text: str, flag: str) -> list[str]:
    ids = [part.strip() for part in text.split(",") if part.strip()]
    if not ids:
        raise ConfigError(f"{flag}: give comma-separated node ids, e.g. {flag} a,b,c")
    return ids


def _cmd_federation(args: argparse.Namespace) -> int:
    from flame.ops.federation_kit import init_federation, resolve_approval
    from flame.protocols.paillier import MIN_KEY_BITS

    if args.bits < MIN_KEY_BITS:
        raise ConfigError(f"--bits {args.bits} is too small; use {MIN_KEY_BITS} or more")
    approved = resolve_approval(args.approve) if args.approve else None

    def progress(line: str) -> None:
        print(f"flame federation: {line}", file=sys.stderr, flush=True)

    if args.threshold is not None:
        progress(f"dealing a {args.bits}-bit threshold key (safe primes; this can take a minute)")
    kit = init_federation(
        args.dir,
        _ids(args.nodes, "--nodes"),
        args.aggregator,
        analysis_id=args.analysis_id,
        host=args.host,
        port=args.port,
        threshold=args.threshold,
        bits=args.bits,
        approved_code=approved,
        data=_pairs(args.data, "--data"),
        progress=progress if args.threshold is not None else None,
    )
    from flame.identity import Roster

    print(f"federation kit {kit.root}: {len(kit.members)} members, analysis {kit.analysis_id}")
    print(f"roster:   {kit.roster} (SHA-256 {Roster.load(kit.roster).fingerprint})")
    print(f"keys:     {kit.root / 'keys'}/NODE.key (0600), NODE.pub")
    print(f"broker:   {kit.broker_dir}/ (passwd, acl, tokens/NODE.token 0600, local.conf)")
    if kit.threshold:
        print(
            f"shares:   {kit.root / 'threshold'}/share-NODE.json (0600): any {kit.threshold} "
            f"of {len(kit.nodes)} decrypt"
        )
    print(f"settings: {kit.root / 'env'}/NODE.env")
    if approved is None:
        print("approved: none (nodes run any code and warn; add --approve ANALYSIS)")
    else:
        print(f"approved: {approved}")
    print(f"run it:   {kit.root / 'run.sh'} ANALYSIS   (or: flame deploy compose|kube)")
    return EXIT_OK


def _cmd_deploy(args: argparse.Namespace) -> int:
    from flame.ops.deploy_files import write_compose, write_kube
    from flame.ops.deploy_spec import DeploySpec
    from flame.ops.federation_kit import Kit, resolve_approval

    if (args.federation is None) == (args.roster is None):
        raise ConfigError("deploy: give --federation DIR, or --roster R with --keys and --broker")
    if args.federation is not None:
        kit = Kit.load(args.federation)
    else:
        if args.keys is None or args.broker is None:
            raise ConfigError("deploy --roster: also give --keys DIR and --broker DIR")
        kit = Kit.from_files(
            args.roster,
            args.keys,
            args.broker,
            analysis_id=args.analysis_id,
            port=args.port or 1883,
            threshold_dir=args.threshold_keys,
        )
    if args.approve:
        code = resolve_approval(args.approve)
    elif kit.approved_code:
        code = kit.approved_code
    else:
        raise ConfigError(
            "deploy: no approved code: give --approve ANALYSIS (or its `flame hash`), or make "
            "the kit with `flame federation init ... --approve ANALYSIS`"
        )
    spec = DeploySpec(
        kit=kit,
        image=args.image,
        code_sha256=code,
        broker_image=args.broker_image,
        flame_image=args.flame_image,
        host_network=args.host_network,
        broker_port=args.port if args.port is not None else kit.broker_port,
        data={node: str(path.resolve()) for node, path in _pairs(args.data, "--data").items()},
        results=str(args.results.resolve()) if args.results else None,
    )
    written = (write_compose if args.kind == "compose" else write_kube)(spec, args.out)
    print(f"wrote {written.main}")
    print(f"broker image recipe: {written.containerfile} (FROM {spec.flame_image}):")
    print(f"  podman build -t {spec.broker_image} -f {written.containerfile} {args.out}")
    print(f"approved code: {code}; containers run as {written.user}, read-only root")
    if args.kind == "kube":
        print(f"then: kubectl apply -f {written.main}   (or podman kube play, see the docs)")
    else:
        print(f"then: cd {args.out} && podman-compose up   (or docker compose up)")
    return EXIT_OK


def add_commands(commands: argparse._SubParsersAction[Any]) -> None:
    """Register `federation` and `deploy` on the `flame` parser."""
    from flame.ops.deploy_spec import BROKER_IMAGE, FLAME_IMAGE

    federation = commands.add_parser(
        "federation",
        help="flame federation init DIR --nodes a,b,c: a whole local federation in one folder",
        description="Write identities, the roster, the broker's passwords and ACL, threshold "
        "key shares (--threshold), each node's settings (env/NODE.env) and run.sh to DIR: a "
        "federation on one machine in one command, and the input of `flame deploy`. For "
        "trying and testing: in production each member makes its own identity.",
    )
    federation.add_argument("action", choices=("init",))
    federation.add_argument("dir", type=Path, help="a new or empty folder")
    federation.add_argument("--nodes", required=True, help="the analysis nodes: a,b,c")
    federation.add_argument("--aggregator", default="aggregator", help="default: aggregator")
    federation.add_argument("--threshold", type=int, metavar="T", help="deal a threshold key")
    federation.add_argument("--bits", type=int, default=2048, help="threshold key size")
    federation.add_argument("--analysis-id", default="study-1", help="default: study-1")
    federation.add_argument("--host", default="127.0.0.1", help="the broker's address")
    federation.add_argument("--port", type=int, default=1883, help="the broker's port")
    federation.add_argument(
        "--approve", metavar="ANALYSIS|SHA256", help="code the nodes run (FLAME_APPROVED_CODE)"
    )
    federation.add_argument(
        "--data", action="append", default=[], metavar="NODE=DIR", help="a node's data folder"
    )
    federation.set_defaults(handler=_cmd_federation)

    deploy = commands.add_parser(
        "deploy",
        help="flame deploy compose|kube --federation DIR --image IMAGE --out OUT: a compose "
        "file or Kubernetes manifests",
        description="A compose file or plain Kubernetes manifests for a federation kit: one "
        "container per node running IMAGE (the analysis image `flame init` builds), a broker "
        "built from flame's image, each node's secrets mounted 0400, non-root, read-only root.",
    )
    deploy.add_argument("kind", choices=("compose", "kube"))
    deploy.add_argument("--federation", type=Path, help="a kit of `flame federation init`")
    deploy.add_argument("--roster", type=Path, help="or: a roster made by hand, with ...")
    deploy.add_argument("--keys", type=Path, help="... the NODE.key files' folder,")
    deploy.add_argument("--broker", type=Path, help="... `flame broker config --out` folder,")
    deploy.add_argument("--threshold-keys", type=Path, help="... and shares' folder (optional)")
    deploy.add_argument("--analysis-id", default="study-1", help="with --roster (study-1)")
    deploy.add_argument("--image", required=True, help="the analysis image every node runs")
    deploy.add_argument("--out", type=Path, required=True, help="a new or empty folder")
    deploy.add_argument(
        "--approve", metavar="ANALYSIS|SHA256", help="approved code (default: the kit's)"
    )
    deploy.add_argument(
        "--data", action="append", default=[], metavar="NODE=DIR", help="a node's data folder"
    )
    deploy.add_argument("--results", type=Path, help="the aggregator's results folder (host)")
    deploy.add_argument("--broker-image", default=BROKER_IMAGE, help=f"default {BROKER_IMAGE}")
    deploy.add_argument("--flame-image", default=FLAME_IMAGE, help=f"default {FLAME_IMAGE}")
    deploy.add_argument("--port", type=int, help="the broker's port (default: the kit's)")
    deploy.add_argument(
        "--host-network",
        action="store_true",
        help="every container on the host's network, the broker on 127.0.0.1 (one machine)",
    )
    deploy.set_defaults(handler=_cmd_deploy)
