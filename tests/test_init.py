"""`flame init`: a runnable analysis from files inside flame, no network needed."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from test_container import Image, built_image

from flame.cli import main
from flame.ops import scaffold

REPO = Path(__file__).resolve().parents[1]


def _no_network_prefix() -> list[str]:
    """`unshare -n` (a network namespace with only a down loopback) where it is allowed."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return []
    probe = subprocess.run([unshare, "-n", "true"], capture_output=True, timeout=30, check=False)
    if probe.returncode == 0:
        return [unshare, "-n"]
    probe = subprocess.run([unshare, "-rn", "true"], capture_output=True, timeout=30, check=False)
    return [unshare, "-rn"] if probe.returncode == 0 else []


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    return built_image(tmp_path_factory)


def _flame(image: Image, *args: str, offline: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*offline, str(image.bin / "flame"), *args],
        env=image.environment(),
        cwd=image.home,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_init_then_simulate_in_a_fresh_venv_without_network(image: Image, tmp_path: Path) -> None:
    offline = _no_network_prefix()
    if offline:  # prove the namespace really has no way out
        reach = subprocess.run(
            [*offline, str(image.python), "-c",
             "import socket; socket.create_connection(('1.1.1.1', 443), timeout=2)"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert reach.returncode != 0
    target = tmp_path / "x"
    made = _flame(image, "init", str(target), offline=offline)
    assert made.returncode == 0, made.stderr
    assert f"flame simulate {target} --data {target / 'data'}" in made.stderr
    run = _flame(image, "simulate", str(target), "--data", str(target / "data"), offline=offline)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {"count": 5, "mean": 7.6}
    # the files came out of the wheel, identical to the repository's templates
    for name in ("analyzer_generic.py", "aggregator_generic.py", "data/node_1/values.csv"):
        assert (target / name).read_bytes() == (REPO / "templates" / name).read_bytes()


@pytest.mark.parametrize("example", ["federated_mean", "federated_histogram"])
def test_init_an_example_in_a_fresh_venv(image: Image, tmp_path: Path, example: str) -> None:
    offline = _no_network_prefix()
    target = tmp_path / example
    made = _flame(image, "init", str(target), "--example", example, offline=offline)
    assert made.returncode == 0, made.stderr
    run = _flame(
        image, "simulate", str(target), "--data", str(target / "data"), "--quiet",
        offline=offline,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    expected = _flame(
        image, "simulate", str(REPO / "examples" / example),
        "--data", str(REPO / "examples" / example / "data"), "--quiet", offline=offline,
    )  # fmt: skip
    assert json.loads(run.stdout) == json.loads(expected.stdout)


def test_list_shows_the_packaged_examples(image: Image) -> None:
    listed = _flame(image, "init", "--list", offline=[])
    assert listed.returncode == 0
    shipped = sorted(p.name for p in (REPO / "examples").iterdir() if (p / "data").is_dir())
    assert "federated_mean" in shipped
    assert listed.stdout.split() == shipped


# ---------------------------------------------------------------- in-process (source checkout)


def test_a_source_checkout_uses_the_repository_folders() -> None:
    root = scaffold.kit_root()
    assert Path(str(root)) in (REPO, REPO / "src" / "flame" / "_kit")
    assert "federated_mean" in scaffold.examples()


def test_refuses_a_non_empty_folder_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "mine.py").write_text("# my own analysis\n")
    assert main(["init", str(tmp_path)]) == 2
    assert "is not empty; use --force" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.py"]


def test_force_replaces_same_names_and_keeps_the_rest(tmp_path: Path) -> None:
    (tmp_path / "mine.py").write_text("# my own analysis\n")
    (tmp_path / "analyzer_generic.py").write_text("broken")
    assert main(["init", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "mine.py").read_text() == "# my own analysis\n"
    template = REPO / "templates" / "analyzer_generic.py"
    assert (tmp_path / "analyzer_generic.py").read_bytes() == template.read_bytes()


def test_unknown_example_names_the_choices(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["init", str(tmp_path / "x"), "--example", "nope"]) == 2
    err = capsys.readouterr().err
    assert "no example named 'nope'" in err and "federated_mean" in err
    assert not (tmp_path / "x").exists()


def test_a_file_is_not_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "f").write_text("x")
    assert main(["init", str(tmp_path / "f")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_dir_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init"]) == 2
    assert "flame init DIR" in capsys.readouterr().err


def test_written_folder_is_clean_and_has_an_image_recipe(tmp_path: Path) -> None:
    made = scaffold.init(tmp_path / "a")
    names = sorted(p.relative_to(made.root).as_posix() for p in made.files)
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert "data/node_1/values.csv" in names and "test_analysis.py" in names
    assert {"Dockerfile", ".dockerignore", "requirements.txt"} <= set(names)
    dockerfile = (made.root / "Dockerfile").read_text()
    assert "FROM ${FLAME_IMAGE}" in dockerfile
    assert "COPY *.py /app/" in dockerfile  # two template files or one analysis.py alike
    assert "RUN flame-install requirements /app/requirements.txt" in dockerfile
    assert f'LABEL {scaffold.IMAGE_LABEL}="${{FLAME_CODE_SHA256}}"' in dockerfile
    # the context is an allow-list: code and requirements in, data, tests and secrets out
    ignore = (made.root / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*") :][:3] == ["*", "!*.py", "!requirements.txt"]
    assert "test_*.py" in ignore
    requirements = (made.root / "requirements.txt").read_text()
    assert all(line.startswith("#") for line in requirements.splitlines())  # installs nothing
    example = scaffold.init(tmp_path / "b", "federated_mean")
    assert (example.root / "Dockerfile").read_text() == dockerfile
    assert example.data == tmp_path / "b" / "data"


def test_force_keeps_the_analysts_requirements(tmp_path: Path) -> None:
    (tmp_path / "requirements.txt").write_text("pandas==2.2.3\n")
    scaffold.init(tmp_path, force=True)
    assert (tmp_path / "requirements.txt").read_text() == "pandas==2.2.3\n"
    assert (tmp_path / "Dockerfile").is_file()


def test_simulate_runs_right_after_init(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    assert main(["simulate", str(tmp_path / "a"), "--data", str(tmp_path / "a" / "data")]) == 0
    assert json.loads(capsys.readouterr().out) == {"count": 5, "mean": 7.6}
