"""Podman for the real-container tests: the engine's flags, the base image, image contents.

What this machine class needs, measured (issue 14): podman's default rlimits are above what
the sandbox permits (`setrlimit RLIMIT_NOFILE: Operation not permitted`), so every container
gets this process's own open-files limit and at most 16384 processes; crun 1.8 refuses
cgroups in hybrid mode, so runc is used when installed. Builds use the host network and see
the host's CA bundle through a read-only mount (plus a pip.conf pointing pip at it, since the
official image's pip carries its own certificates); neither is baked into a layer.
No shell, every call bounded.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import ssl
import subprocess
import tarfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STANDIN_SCRIPT = REPO / "docker" / "standin-base.sh"
OFFICIAL_BASE = "docker.io/library/python:3.11-slim-bookworm"
STANDIN_BASE = "localhost/python:3.11-slim-bookworm"
CA_IN_IMAGE = "/etc/ssl/certs/ca-certificates.crt"


class EngineUnusable(RuntimeError):
    """Podman is missing or cannot run a container here; the message says why."""


def _limit(kind: int, ceiling: int | None = None) -> str:
    """This process's soft:hard limit, at most `ceiling`, as podman's --ulimit wants it."""
    values = []
    for value in resource.getrlimit(kind):
        if ceiling is not None and (value == resource.RLIM_INFINITY or value > ceiling):
            value = ceiling
        values.append("-1" if value == resource.RLIM_INFINITY else str(value))
    return ":".join(values)


def host_ca_bundle() -> Path | None:
    """The CA bundle this machine trusts (SSL_CERT_FILE, else OpenSSL's default file)."""
    for candidate in (os.environ.get("SSL_CERT_FILE"), ssl.get_default_verify_paths().cafile):
        if candidate and Path(candidate).is_file():
            return Path(candidate).resolve()
    return None


def cache_dir() -> Path:
    """Where the stand-in base tarball is kept between runs (outside the repository)."""
    configured = os.environ.get("FLAME_CI_CACHE")
    for candidate in (configured, "/var/cache/flame-ci", str(Path.home() / ".cache/flame-ci")):
        if not candidate:
            continue
        path = Path(candidate)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(path, os.W_OK):
            return path
    raise EngineUnusable("no writable cache folder for the stand-in base image")


@dataclass
class Podman:
    program: str
    runtime: list[str]
    limits: list[str]
    work: Path
    log: list[str] = field(default_factory=list)

    @classmethod
    def find(cls, work: Path) -> Podman:
        program = shutil.which("podman")
        if program is None:
            raise EngineUnusable("podman is not installed (apt-get install podman runc ...)")
        runc = shutil.which("runc") or shutil.which("runc", path="/usr/sbin:/sbin")
        runtime = ["--runtime", runc] if runc else []
        limits = [
            "--ulimit", f"nofile={_limit(resource.RLIMIT_NOFILE)}",
            # measured: runc here refuses nproc above ~32k although this shell has 96k
            "--ulimit", f"nproc={_limit(resource.RLIMIT_NPROC, ceiling=16384)}",
        ]  # fmt: skip
        work.mkdir(parents=True, exist_ok=True)
        engine = cls(program, runtime, limits, work)
        info = engine("info", "--format", "{{.Host.OCIRuntime.Name}}", timeout=60, check=False)
        if info.returncode != 0:
            raise EngineUnusable(f"`podman info` fails: {info.stderr.strip()[-300:]}")
        return engine

    def __call__(
        self, *args: str, timeout: float = 120, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [self.program, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            input=input,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args[:3])} ... exited {done.returncode}:\n"
                f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        return done

    def exists(self, image: str) -> bool:
        return self("image", "exists", image, timeout=30, check=False).returncode == 0

    # --------------------------------------------------------------------------- building

    def build_flags(self) -> list[str]:
        flags = ["--network=host", *self.runtime, *self.limits]
        ca = host_ca_bundle()
        if ca is not None:
            pip_conf = self.work / "pip.conf"
            pip_conf.write_text(f"[global]\ncert = {CA_IN_IMAGE}\n")
            flags += ["-v", f"{ca}:{CA_IN_IMAGE}:ro", "-v", f"{pip_conf}:/etc/pip.conf:ro"]
        return flags

    def build(
        self,
        context: Path,
        tag: str,
        build_args: dict[str, str],
        timeout: float = 900,
        no_cache: bool = False,
    ) -> tuple[float, subprocess.CompletedProcess[str]]:
        """`podman build` of `context`; the seconds it took and its output (not checked).
        `no_cache` for a test that reads a step's output: a cached layer prints nothing, and
        CI machines keep podman's layer cache between runs."""
        args = [f"--build-arg={name}={value}" for name, value in build_args.items()]
        if no_cache:
            args.append("--no-cache")
        started = time.monotonic()
        done = self("build", *self.build_flags(), *args, "-t", tag, str(context),
                    timeout=timeout, check=False)  # fmt: skip
        return time.monotonic() - started, done

    def size(self, image: str) -> int:
        return int(self("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())

    def inspect(self, image: str) -> dict[str, object]:
        data = json.loads(self("image", "inspect", image).stdout)
        assert isinstance(data, list) and data, data
        return dict(data[0])

    # --------------------------------------------------------------------------- the base

    def base_image(self) -> tuple[str, str]:
        """(image, how it was obtained): the official python:3.11-slim when it can be pulled,
        else the stand-in, imported from a cached tarball or built by standin-base.sh."""
        if self.exists(OFFICIAL_BASE):
            return OFFICIAL_BASE, "official image, already present"
        pulled = self("pull", "--quiet", OFFICIAL_BASE, timeout=300, check=False)
        if pulled.returncode == 0:
            return OFFICIAL_BASE, "official image, pulled"
        reason = (pulled.stderr.strip().splitlines() or ["?"])[-1][-160:]
        self.log.append(f"cannot pull {OFFICIAL_BASE}: {reason}")
        keyed = f"localhost/python-standin:{self.standin_key()}"
        if not self.exists(keyed):
            tarball = self.standin_tarball()
            self("import", "--quiet", "--change", 'CMD ["python3"]', str(tarball), keyed,
                 timeout=300)  # fmt: skip
            how = f"stand-in, imported from {tarball}"
        else:
            how = "stand-in, already imported"
        self("tag", keyed, STANDIN_BASE, timeout=60)
        return STANDIN_BASE, how

    def standin_key(self) -> str:
        """The stand-in's identity: its script and this machine's apt sources."""
        digest = hashlib.sha256(STANDIN_SCRIPT.read_bytes())
        for source in sorted(Path("/etc/apt").glob("sources.list*")) + sorted(
            Path("/etc/apt/sources.list.d").glob("*")
        ):
            if source.is_file():
                digest.update(source.read_bytes())
        return digest.hexdigest()[:16]

    def standin_tarball(self) -> Path:
        """The stand-in's root file system, cached outside the repository (a minute saved)."""
        tarball = cache_dir() / f"python-3.11-standin-{self.standin_key()}.tar"
        if tarball.is_file():
            self.log.append(f"stand-in base from cache {tarball}")
            return tarball
        started = time.monotonic()
        made = subprocess.run(
            ["sh", str(STANDIN_SCRIPT), str(tarball)],
            capture_output=True, text=True, timeout=900, check=False,
        )  # fmt: skip
        if made.returncode != 0:
            raise EngineUnusable(f"standin-base.sh failed:\n{made.stderr[-2000:]}")
        self.log.append(f"stand-in base built in {time.monotonic() - started:.0f} s")
        return tarball

    # --------------------------------------------------------------------------- contents

    @contextmanager
    def filesystem(self, image: str) -> Iterator[tarfile.TarFile]:
        """The image's file system as a tar stream (`podman export` of a created container)."""
        name = f"flame-export-{os.getpid()}-{time.monotonic_ns()}"
        self("create", "--name", name, image, "true", timeout=60)  # never started
        try:
            with subprocess.Popen([self.program, "export", name], stdout=subprocess.PIPE) as export:
                assert export.stdout is not None
                with tarfile.open(fileobj=export.stdout, mode="r|") as tar:
                    yield tar
                export.wait(timeout=120)
        finally:
            self("rm", "--force", name, timeout=60, check=False)


def scan(tar: tarfile.TarFile, needles: Iterable[bytes]) -> tuple[list[str], dict[bytes, str]]:
    """Every member name, and for each needle the first file whose content holds it."""
    wanted = list(needles)
    names: list[str] = []
    found: dict[bytes, str] = {}
    for member in tar:
        names.append("/" + member.name.lstrip("./"))
        if not member.isfile() or not wanted:
            continue
        handle = tar.extractfile(member)
        if handle is None:
            continue
        data = handle.read()
        for needle in wanted:
            if needle not in found and needle in data:
                found[needle] = names[-1]
    return names, found
