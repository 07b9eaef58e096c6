"""The container smoke test: the image, reproduced without a container engine.

No engine runs on CI, so this replays the Dockerfile itself: it parses every instruction,
builds each stage in a folder of its own (COPY from the build context honouring
.dockerignore, bind mounts mapped to host paths, ENV and WORKDIR applied), and runs each RUN
line. A RUN line that is not a call of docker/install.sh, or an instruction it does not
know, fails the test: the Dockerfile cannot change without this test running the change.
The "image" is a fresh virtualenv that sees the test environment's dependencies (so nothing
is downloaded) but gets flame only from the wheel the Dockerfile's first stage builds.

Then the image's ENTRYPOINT runs an aggregator and two analysis nodes against a real MQTT
broker, configured by environment variables only.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import venv
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath

import pytest

from flame.analysis.code_hash import analysis_code_hash
from flame.ops.scaffold import IMAGE_LABEL

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
INSTALL_SCRIPT = "install.sh"
STEP_TIMEOUT = 300.0

# instructions that change nothing a process sees, or that the harness applies itself
_KNOWN = {"FROM", "ARG", "ENV", "WORKDIR", "COPY", "RUN", "USER", "ENTRYPOINT", "CMD",
          "STOPSIGNAL", "LABEL", "EXPOSE"}  # fmt: skip


_NETWORK_VARIABLES = {
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "SSL_CERT_FILE", "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
}  # fmt: skip


class Unreproducible(AssertionError):
    """The Dockerfile does something this harness cannot replay faithfully."""


class StepFailed(AssertionError):
    """A RUN step failed, as it would fail `docker build`."""

    def __init__(self, step: str, output: str) -> None:
        super().__init__(f"Dockerfile step failed: {step}\n{output[-4000:]}")
        self.step = step
        self.output = output


# --------------------------------------------------------------------------------- parsing


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int

    def __str__(self) -> str:
        return f"line {self.line}: {self.keyword} {self.args}"


@dataclass
class Stage:
    name: str | None
    base: str
    instructions: list[Instruction] = field(default_factory=list)


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages with their instructions; continuation lines joined, comments dropped."""
    logical: list[tuple[int, str]] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append((start, pending + stripped))
        pending = ""
    if pending:
        raise Unreproducible("the Dockerfile ends in a line continuation")
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword not in _KNOWN:
            raise Unreproducible(f"line {number}: the smoke test cannot replay {keyword}")
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
            continue
        if keyword == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], ""), words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(name, base))
            continue
        if not stages:
            raise Unreproducible(f"line {number}: {keyword} before the first FROM")
        stages[-1].instructions.append(Instruction(keyword, rest, number))
    if not stages:
        raise Unreproducible("the Dockerfile has no FROM")
    return stages


def _env_pairs(args: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in shlex.split(args):
        name, sep, value = item.partition("=")
        if not sep:
            raise Unreproducible(f"ENV {args!r}: use the NAME=value form")
        pairs[name] = value
    return pairs


def _mount(spec: str) -> dict[str, str]:
    fields = dict(part.split("=", 1) for part in spec.split(","))
    if fields.get("type", "bind") != "bind":
        raise Unreproducible(f"--mount={spec}: only bind mounts can be replayed")
    return fields


def _dockerignore(context: Path) -> list[str]:
    path = context / ".dockerignore"
    if not path.is_file():
        return []
    return [
        line.strip()
        for line in path.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def _ignored(relative: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches decides; `!pattern` lets a path back in."""
    ignored = False
    parts = relative.split("/")
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.removeprefix("!")
        bare = pattern.removeprefix("**/")
        if fnmatch(relative, pattern) or any(fnmatch(part, bare) for part in parts):
            ignored = not negated
    return ignored


# --------------------------------------------------------------------------------- replay


@dataclass
class Image:
    """What the replay produced: the interpreter, the final stage's root, ENV and entry point."""

    venv: Path
    root: Path
    env: dict[str, str]
    workdir: str
    user: str
    entrypoint: list[str]
    stopsignal: str
    home: Path
    app_dir: Path | None = None  # an analysis image's /app, kept apart from the base image's
    labels: dict[str, str] = field(default_factory=dict)

    def host(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    @property
    def bin(self) -> Path:
        return self.venv / "bin"

    @property
    def python(self) -> Path:
        return self.bin / "python"

    @property
    def app(self) -> Path:
        return self.app_dir if self.app_dir is not None else self.host("/app")

    def environment(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """A container's environment: the image's ENV plus `extra`, nothing of the test's."""
        env = {
            "PATH": f"{self.bin}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.home),
            "LANG": "C.UTF-8",
            "TMPDIR": str(self.home),
            "FLAME_APP_DIR": str(self.app),
        }
        env.update(self.env)
        env.update(extra or {})
        return env

    def argv(self, args: list[str] | None = None) -> list[str]:
        program = shutil.which(self.entrypoint[0], path=str(self.bin))
        assert program is not None, f"{self.entrypoint[0]} is not installed in the image"
        return [program, *self.entrypoint[1:], *(args or [])]

    def run(
        self, args: list[str] | None = None, env: dict[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(args),
            env=self.environment(env),
            cwd=self.host(self.workdir),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as err:
            return subprocess.Popen(
                self.argv(),
                env=self.environment(env),
                cwd=self.host(self.workdir),
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
            )

    def derive(
        self, dockerfile: Path, app: Path, build_args: dict[str, str] | None = None
    ) -> Image:
        """Replay an analysis image's Dockerfile (`flame init` writes it: FROM this image,
        COPY into /app honouring its .dockerignore, RUN flame-install, LABEL); its /app is
        `app`, so the base image stays as built for other tests. The labels land in
        `self.labels` of the result."""
        context = dockerfile.parent
        ignore = _dockerignore(context)
        app.mkdir(parents=True, exist_ok=True)
        args = dict(build_args or {})
        labels: dict[str, str] = {}

        def expand(text: str) -> str:
            return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], ""), text)

        def host(path: str) -> str:
            if path == "/app" or path.startswith("/app/"):
                return str(app) + path[len("/app") :]
            return path

        for stage in parse_dockerfile(dockerfile.read_text()):
            for step in stage.instructions:
                if step.keyword in ("USER", "WORKDIR"):
                    continue  # the replay has no users; /app is the only folder it writes
                if step.keyword == "ARG":
                    name, _, default = step.args.partition("=")
                    args.setdefault(name.strip(), default.strip().strip('"'))
                elif step.keyword == "LABEL":
                    for item in shlex.split(expand(step.args)):
                        key, _, value = item.partition("=")
                        labels[key] = value
                elif step.keyword == "COPY":
                    *sources, dest = shlex.split(step.args)
                    if not (dest.rstrip("/") == "/app" or dest.startswith("/app/")):
                        raise Unreproducible(f"analysis Dockerfile {step}: copies outside /app")
                    for pattern in sources:
                        matches = [
                            path
                            for path in sorted(context.glob(pattern))
                            if not _ignored(path.relative_to(context).as_posix(), ignore)
                        ]
                        if not matches:
                            raise StepFailed(str(step), f"no file in the context matches {pattern}")
                        for path in matches:
                            shutil.copy2(path, app / path.name)
                elif step.keyword == "RUN":
                    words = [expand(word) for word in shlex.split(step.args)]
                    if not words or words[0] != "flame-install":
                        raise Unreproducible(f"analysis Dockerfile {step}: only flame-install runs")
                    done = subprocess.run(
                        [str(self.bin / "flame-install"), *(host(word) for word in words[1:])],
                        env={**self.environment(), "FLAME_INSTALL_PYTHON": str(self.python)},
                        cwd=self.home, capture_output=True, text=True, timeout=STEP_TIMEOUT,
                        check=False,
                    )  # fmt: skip
                    if done.returncode != 0:
                        raise StepFailed(str(step), done.stdout + done.stderr)
                else:
                    raise Unreproducible(f"analysis Dockerfile {step}: not expected there")
        return replace(self, app_dir=app, labels=labels)


def outer_site_packages() -> list[str]:
    return [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]


def make_python(path: Path) -> Path:
    """A fresh interpreter environment: the test's dependencies are visible through a .pth
    (nothing to download), but not flame's editable install, whose own .pth is not read."""
    venv.EnvBuilder(with_pip=False, clear=True, symlinks=True).create(path)
    query = "import sysconfig; print(sysconfig.get_path('purelib'))"
    purelib = subprocess.run(
        [str(path / "bin" / "python"), "-c", query],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.strip()  # fmt: skip
    Path(purelib, "_outer_site.pth").write_text("\n".join(outer_site_packages()) + "\n")
    return path


class Replay:
    """Replays a Dockerfile into folders under `work`, the context being `context`."""

    def __init__(self, dockerfile: Path, context: Path, work: Path) -> None:
        self.stages = parse_dockerfile(dockerfile.read_text())
        self.context = context
        self.work = work
        self.ignore = _dockerignore(context)
        self.venv = make_python(work / "python")
        self.home = work / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.plan()

    def plan(self) -> None:
        """Refuse anything that cannot be replayed before running any of it."""
        names = {stage.name for stage in self.stages if stage.name}
        for stage in self.stages:
            if not re.match(r"^python:3\.\d+(\.\d+)?-slim", stage.base):
                raise Unreproducible(f"stage base {stage.base!r} is not a slim Python image")
            for step in stage.instructions:
                if step.keyword == "RUN":
                    self._command(step, names=names, check_only=True)
                if step.keyword == "COPY":
                    for flag in (w for w in shlex.split(step.args) if w.startswith("--")):
                        if not flag.startswith("--from="):
                            raise Unreproducible(f"{step}: COPY flag {flag} is not replayed")

    def _command(
        self,
        step: Instruction,
        *,
        names: set[str] | None = None,
        roots: dict[str, Path] | None = None,
        root: Path | None = None,
        check_only: bool = False,
    ) -> list[str]:
        words = shlex.split(step.args)
        if words and words[0].startswith("["):
            raise Unreproducible(f"{step}: use the shell form to call {INSTALL_SCRIPT}")
        mounts: list[tuple[str, Path]] = []
        while words and words[0].startswith("--"):
            flag = words.pop(0)
            if not flag.startswith("--mount="):
                raise Unreproducible(f"{step}: RUN flag {flag} is not replayed")
            spec = _mount(flag.removeprefix("--mount="))
            source = spec.get("source", spec.get("src", "."))
            target = spec.get("target", spec.get("dst", spec.get("destination", "")))
            origin = spec.get("from")
            if origin is not None and names is not None and origin not in names:
                raise Unreproducible(f"{step}: mount from unknown stage {origin!r}")
            if check_only:
                continue
            assert roots is not None
            base = roots[origin] / source.lstrip("/") if origin else self.context / source
            mounts.append((target.rstrip("/"), base))
        if len(words) != 4 or words[0] != "sh" or PurePosixPath(words[1]).name != INSTALL_SCRIPT:
            raise Unreproducible(
                f"{step}: every RUN must be `sh .../{INSTALL_SCRIPT} MODE DIR` (the smoke test "
                "replays that script; put new install steps into it)"
            )
        if check_only:
            return words
        assert root is not None
        mapped: list[str] = []
        for word in words:
            for target, host in sorted(mounts, key=lambda m: -len(m[0])):
                if word == target or word.startswith(target + "/"):
                    word = str(host) + word[len(target) :]
                    break
            else:
                if word.startswith("/"):
                    word = str(root / word.lstrip("/"))
            mapped.append(word)
        return mapped

    def _copy(self, step: Instruction, root: Path, workdir: str, roots: dict[str, Path]) -> None:
        words = shlex.split(step.args)
        origin = None
        if words[0].startswith("--from="):
            origin = words.pop(0).removeprefix("--from=")
        *sources, dest = words
        dest_path = dest if dest.startswith("/") else f"{workdir.rstrip('/')}/{dest}"
        target = root / dest_path.lstrip("/")
        into_dir = dest.endswith("/") or len(sources) > 1
        for source in sources:
            base = roots[origin] if origin else self.context
            path = base / source.lstrip("/")
            if path.is_dir():
                self._copy_tree(path, target, base)
            else:
                out = target / path.name if into_dir else target
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, out)

    def _copy_tree(self, source: Path, target: Path, base: Path) -> None:
        for path in sorted(source.rglob("*")):
            relative = path.relative_to(base).as_posix()
            if base == self.context and _ignored(relative, self.ignore):
                continue
            out = target / path.relative_to(source)
            if path.is_dir():
                out.mkdir(parents=True, exist_ok=True)
            elif path.is_file():
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, out)

    def build(self) -> Image:
        roots: dict[str, Path] = {}
        image: Image | None = None
        for index, stage in enumerate(self.stages):
            root = self.work / f"stage{index}"
            root.mkdir(parents=True, exist_ok=True)
            env: dict[str, str] = {}
            workdir, user, entrypoint, stopsignal = "/", "root", [], "SIGTERM"
            for step in stage.instructions:
                if step.keyword == "ENV":
                    env.update(_env_pairs(step.args))
                elif step.keyword == "WORKDIR":
                    workdir = step.args if step.args.startswith("/") else f"{workdir}/{step.args}"
                    (root / workdir.lstrip("/")).mkdir(parents=True, exist_ok=True)
                elif step.keyword == "COPY":
                    self._copy(step, root, workdir, roots)
                elif step.keyword == "RUN":
                    self._run(step, root, workdir, env, roots)
                elif step.keyword == "USER":
                    user = step.args
                elif step.keyword == "ENTRYPOINT":
                    entrypoint = json.loads(step.args)
                elif step.keyword == "STOPSIGNAL":
                    stopsignal = step.args
            if stage.name:
                roots[stage.name] = root
            roots[str(index)] = root
            image = Image(self.venv, root, env, workdir, user, entrypoint, stopsignal, self.home)
        assert image is not None
        return image

    def _run(
        self,
        step: Instruction,
        root: Path,
        workdir: str,
        env: dict[str, str],
        roots: dict[str, Path],
    ) -> None:
        command = self._command(step, roots=roots, root=root)
        environment = {
            "PATH": f"{self.venv / 'bin'}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.home),
            "TMPDIR": str(self.home),
            "LANG": "C.UTF-8",
            **env,
            # the three knobs of install.sh that differ outside a container (see its header)
            "FLAME_INSTALL_PYTHON": str(self.venv / "bin" / "python"),
            "FLAME_INSTALL_UID": "",
            "FLAME_INSTALL_APP_DIR": str(root / "app"),
        }
        for name, value in os.environ.items():  # the machine's package index settings and
            if name.startswith("PIP_") or name.upper() in _NETWORK_VARIABLES:  # proxies, as a
                environment.setdefault(name, value)  # docker build has its own
        try:
            done = subprocess.run(
                command,
                cwd=root / workdir.lstrip("/"),
                env=environment,
                capture_output=True,
                text=True,
                timeout=STEP_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise StepFailed(str(step), f"timed out after {STEP_TIMEOUT:g} s") from None
        if done.returncode != 0:
            raise StepFailed(str(step), done.stdout + done.stderr)


def build_context(destination: Path) -> Path:
    """A copy of the files the Dockerfile may use, to break on purpose."""
    destination.mkdir(parents=True, exist_ok=True)
    for name in ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, destination / name)
    for folder in ("src", "templates", "examples", "docker"):
        shutil.copytree(
            REPO / folder, destination / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    return destination


_BUILT: dict[str, Image] = {}


def built_image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    """The image of the repository's Dockerfile, replayed once per test session."""
    if "image" not in _BUILT:
        work = tmp_path_factory.mktemp("image")
        _BUILT["image"] = Replay(DOCKERFILE, REPO, work).build()
    return _BUILT["image"]


@pytest.fixture(scope="session")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    return built_image(tmp_path_factory)


# --------------------------------------------------------------------------------- the broker


def _transport_available() -> str | None:
    try:
        import flame.transport.mqtt  # noqa: F401
    except ImportError as exc:
        return f"the MQTT transport is not available yet ({exc})"
    return None


@pytest.fixture
def broker() -> Iterator[object]:
    missing = _transport_available()
    if missing:
        pytest.skip(missing)
    try:
        from broker import Broker, have_mosquitto
    except ImportError:
        pytest.skip("tests/broker.py is not available")
    if not have_mosquitto() and importlib.util.find_spec("amqtt") is None:
        pytest.skip("neither mosquitto nor amqtt is installed")
    users = ("aggregator", "clinic-a", "clinic-b", "watcher")
    with Broker(users=users) as running:
        yield running


# --------------------------------------------------------------------------------- tests


def test_dockerfile_is_a_slim_non_root_image_without_secrets() -> None:
    stages = parse_dockerfile(DOCKERFILE.read_text())
    final = stages[-1]
    assert re.match(r"^python:3\.1\d-slim", final.base), final.base
    users = [s.args for s in final.instructions if s.keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    entry = [s.args for s in final.instructions if s.keyword == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["flame-entrypoint"]  # exec form: exit code = run's
    secretish = re.compile(r"(?i)token|secret|password|passwd|private|credential|_key\b")
    for stage in stages:
        for step in stage.instructions:
            if step.keyword in ("ENV", "ARG"):
                for name in _env_pairs(step.args) if "=" in step.args else [step.args]:
                    assert not secretish.search(name), f"{step} looks like a baked-in secret"
            if step.keyword == "COPY":
                assert not re.search(r"\.(pem|key|env)\b", step.args), step
    ignored = _dockerignore(REPO)
    for must in (".git", "**/.env", "**/*.pem", "tests"):
        assert must in ignored, f".dockerignore should exclude {must}"
    assert not _ignored("src/flame/utils/token.py", ignored)


def test_every_install_step_is_the_shared_script() -> None:
    stages = parse_dockerfile(DOCKERFILE.read_text())
    runs = [step for stage in stages for step in stage.instructions if step.keyword == "RUN"]
    modes = [shlex.split(step.args)[-2] for step in runs]
    assert modes == ["wheel", "install"]


def test_replayed_image_has_flame_from_the_wheel_with_templates(image: Image) -> None:
    probe = subprocess.run(
        [str(image.python), "-c",
         "import flame, flame.ops.scaffold as s; print(flame.__file__); print(s.kit_root())"],
        capture_output=True, text=True, timeout=60, check=True,
        env=image.environment(), cwd=image.home,
    )  # fmt: skip
    module, kit = probe.stdout.split()
    assert module.startswith(str(image.venv)), module
    assert kit.startswith(str(image.venv)) and kit.endswith("_kit"), kit
    assert (image.bin / "flame-entrypoint").is_file()
    assert image.app.is_dir()
    assert image.env["FLAME_LOG_FORMAT"] == "json"
    assert image.stopsignal == "SIGINT"


def _analysis_image(image: Image, tmp_path: Path) -> tuple[Image, Path]:
    """`flame init` run inside the image, then the analysis image built FROM it."""
    made = image.run(["init", str(tmp_path / "analysis")])
    assert made.returncode == 0, made.stderr
    digest = analysis_code_hash(tmp_path / "analysis")
    derived = image.derive(
        tmp_path / "analysis" / "Dockerfile", tmp_path / "app", {"FLAME_CODE_SHA256": digest}
    )
    assert derived.labels == {IMAGE_LABEL: digest}
    return derived, tmp_path / "analysis"


def test_entrypoint_exit_code_is_the_outcome(image: Image, tmp_path: Path) -> None:
    empty = image.run()  # the base image alone has no analysis in /app
    assert empty.returncode == 1
    assert "holds no Python files" in empty.stderr
    derived, _ = _analysis_image(image, tmp_path)
    bad = derived.run(env={"FLAME_EPOCHS": "many"})
    assert bad.returncode == 2, bad.stderr
    assert "FLAME_EPOCHS" in bad.stderr
    missing = derived.run()  # no node settings at all
    assert missing.returncode == 2, missing.stderr
    assert "FLAME_NODE_ID" in missing.stderr
    check = derived.run(["check"])  # any flame command instead of the run
    assert check.returncode == 1
    assert check.stdout.startswith("FAIL config")


def test_container_runs_a_federation_with_env_only(
    image: Image, broker: object, tmp_path: Path
) -> None:
    from broker import Broker

    assert isinstance(broker, Broker)
    image, analysis = _analysis_image(image, tmp_path)  # FROM flame; COPY the code files
    assert sorted(p.name for p in image.app.iterdir()) == [
        "aggregator_generic.py",
        "analyzer_generic.py",
        "main_generic.py",
        "requirements.txt",
    ]  # not test_analysis.py, not data/, not Dockerfile (the .dockerignore `flame init` wrote)
    common = {
        "FLAME_ANALYSIS_ID": "smoke",
        "FLAME_PARTICIPANTS": "clinic-a,clinic-b",
        "FLAME_BROKER__URL": broker.url,
        "FLAME_BROKER__TOKEN": broker.password,
        "FLAME_PRESENCE_TIMEOUT": "60",
        "FLAME_EPOCH_TIMEOUT": "60",
    }
    data = analysis / "data"
    nodes = {
        "aggregator": {"FLAME_NODE_ID": "aggregator", "FLAME_ROLE": "aggregation"},
        "clinic-a": {
            "FLAME_NODE_ID": "clinic-a",
            "FLAME_ROLE": "analysis",
            "FLAME_DATA_DIR": str(data / "node_1"),
        },
        "clinic-b": {
            "FLAME_NODE_ID": "clinic-b",
            "FLAME_ROLE": "analysis",
            "FLAME_DATA_DIR": str(data / "node_2"),
        },
    }
    from identities import federation

    identities = federation(tmp_path / "identities", ["clinic-a", "clinic-b"])
    processes = {
        name: image.start({**common, **extra, **identities[name]}, tmp_path / f"{name}.log")
        for name, extra in nodes.items()
    }
    outputs: dict[str, str] = {}
    deadline = time.monotonic() + 120
    try:
        for name, process in processes.items():
            out, _ = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs[name] = out.decode()
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(10)
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in nodes}
    for name, process in processes.items():
        assert process.returncode == 0, f"{name} exited {process.returncode}:\n{logs[name]}"
    for name in nodes:
        assert json.loads(outputs[name]) == {"count": 5, "mean": 7.6}, name
        lines = [json.loads(line) for line in logs[name].splitlines() if line.strip()]
        assert lines, f"{name} logged nothing"
        for line in lines:  # JSON lines (the image's FLAME_LOG_FORMAT), each naming its node
            assert line["node_id"] == name and line["analysis_id"] == "smoke"
        assert broker.password not in logs[name] + outputs[name]


def test_a_single_file_analysis_builds_and_is_labelled(image: Image, tmp_path: Path) -> None:
    made = image.run(["init", str(tmp_path / "mean"), "--example", "federated_mean"])
    assert made.returncode == 0, made.stderr
    (tmp_path / "mean" / ".env").write_text("TOKEN=never-in-the-image\n")
    digest = analysis_code_hash(tmp_path / "mean")
    derived = image.derive(
        tmp_path / "mean" / "Dockerfile", tmp_path / "app", {"FLAME_CODE_SHA256": digest}
    )
    assert sorted(p.name for p in derived.app.iterdir()) == ["analysis.py", "requirements.txt"]
    assert derived.labels[IMAGE_LABEL] == digest


@pytest.mark.parametrize(
    ("given", "says"),
    [("0" * 64, "is not the hash of the code"), ("", "no FLAME_CODE_SHA256 given")],
)
def test_the_analysis_image_refuses_a_wrong_code_hash(
    image: Image, tmp_path: Path, given: str, says: str
) -> None:
    made = image.run(["init", str(tmp_path / "analysis")])
    assert made.returncode == 0, made.stderr
    digest = analysis_code_hash(tmp_path / "analysis")
    with pytest.raises(StepFailed) as failed:
        image.derive(
            tmp_path / "analysis" / "Dockerfile", tmp_path / "app", {"FLAME_CODE_SHA256": given}
        )
    assert "flame-install code" in failed.value.step
    assert says in failed.value.output and digest in failed.value.output


# ------------------------------------------------------------- the test fails when it should


def _break(context: Path, old: str, new: str, file: str = "Dockerfile") -> None:
    path = context / file
    text = path.read_text()
    assert old in text, f"{old!r} not in {file}"
    path.write_text(text.replace(old, new, 1))


def test_a_broken_run_line_fails_the_replay(tmp_path: Path) -> None:
    context = build_context(tmp_path / "context")
    _break(context, "install.sh install /tmp/flame-wheels", "install.sh install /tmp/no-wheels")
    with pytest.raises(StepFailed) as failed:
        Replay(context / "Dockerfile", context, tmp_path / "work").build()
    assert "install.sh install /tmp/no-wheels" in failed.value.step
    assert "expected exactly one flame wheel" in failed.value.output


def test_a_broken_install_script_fails_the_replay(tmp_path: Path) -> None:
    context = build_context(tmp_path / "context")
    _break(context, '"$bindir/flame" init "$scratch/analysis"', '"$bindir/flame" init',
           file="docker/install.sh")  # fmt: skip
    with pytest.raises(StepFailed) as failed:
        Replay(context / "Dockerfile", context, tmp_path / "work").build()
    assert "install.sh install" in failed.value.step


@pytest.mark.parametrize(
    "extra",
    [
        "RUN pip install requests",
        'RUN ["sh", "/tmp/flame-docker/install.sh", "install", "/tmp/flame-wheels"]',
        "ADD https://example.org/tool /usr/local/bin/tool",
        "RUN --network=none sh /tmp/flame-docker/install.sh install /tmp/flame-wheels",
    ],
)
def test_a_step_the_test_cannot_replay_fails_it(tmp_path: Path, extra: str) -> None:
    context = build_context(tmp_path / "context")
    _break(context, "WORKDIR /app", f"{extra}\nWORKDIR /app")
    with pytest.raises(Unreproducible):
        Replay(context / "Dockerfile", context, tmp_path / "work")
