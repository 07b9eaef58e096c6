"""`flame simulate` as a user runs it: a subprocess, its exit code, stdout, stderr and files."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import flame as flame_package

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "federated_mean"
TIMEOUT = 60  # a generous bound for a command that should take about a second


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("FLAME_")}
    env.update(extra)
    return env


def flame(
    *args: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flame", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=clean_env() if env is None else env,
        cwd=cwd,
        check=False,
    )


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def assert_clean_failure(run: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit != 0, no flame frames in any traceback (the failing analysis's own frames are
    shown), exactly one error line on stderr naming the fragments."""
    assert run.returncode != 0, run
    flame_dir = str(Path(flame_package.__file__).resolve().parent)
    frames = re.findall(r'File "([^"]+)"', run.stderr)
    assert not [f for f in frames if str(Path(f).resolve()).startswith(flame_dir)], run.stderr
    error_lines = [line for line in lines(run.stderr) if line.startswith("flame:")]
    assert len(error_lines) == 1, run.stderr
    for fragment in fragments:
        assert fragment in error_lines[0], (fragment, run.stderr)
    return error_lines[0]


def read_columns(files: list[Path], only: set[str] | None = None) -> dict[str, np.ndarray]:
    """The pooled data, read independently of flame: numeric columns of every file."""
    columns: dict[str, list[float]] = {}
    for path in files:
        with path.open(newline="") as stream:
            for row in csv.DictReader(stream):
                for name, cell in row.items():
                    if only is None or name in only:
                        value = float(cell) if cell.strip() else np.nan
                        columns.setdefault(name, []).append(value)
    return {name: np.array(values) for name, values in columns.items()}


# --- the example -----------------------------------------------------------------------------


def test_federated_mean_example_equals_pooled_computation(tmp_path: Path) -> None:
    output = tmp_path / "out.json"
    started = time.monotonic()
    run = flame("simulate", EXAMPLE, "--data", EXAMPLE / "data", "--output", output)
    assert run.returncode == 0, run.stderr
    assert time.monotonic() - started < TIMEOUT
    assert "Traceback" not in run.stderr

    csv_files = sorted((EXAMPLE / "data").glob("*/*.csv"))
    nodes = sorted(p.name for p in (EXAMPLE / "data").iterdir() if p.is_dir())
    assert len(nodes) >= 2 and len(csv_files) > len(nodes)  # several files on some node
    pooled = read_columns(csv_files)

    document = json.loads(output.read_text())
    result = document["result"]
    assert sorted(result) == sorted(pooled)
    for column, values in pooled.items():
        values = values[~np.isnan(values)]
        assert result[column]["n"] == values.size
        assert abs(result[column]["mean"] - values.mean()) <= 1e-9
        assert abs(result[column]["std"] - values.std(ddof=1)) <= 1e-9

    assert document["epochs"] == 1
    [epoch] = document["history"]
    assert epoch["epoch"] == 0 and epoch["nodes"] == nodes and epoch["missing"] == []
    assert json.loads(run.stdout) == result  # the result is printed too

    # progress on a non-terminal: plain lines, one per epoch, naming the nodes that answered
    assert "\r" not in run.stderr and "\033" not in run.stderr
    progress = [line for line in lines(run.stderr) if line.startswith("epoch 0:")]
    assert len(progress) == 1 and all(node in progress[0] for node in nodes)


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "flame"
    if not script.exists():
        pytest.skip("the flame console script is not next to this interpreter")
    run = subprocess.run(
        [str(script), "simulate", "--help"], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert run.returncode == 0 and "--data" in run.stdout


# --- a separately written analysis in the templates' shape -----------------------------------

ANALYZER = '''
    """Federated min / max / count / sum of the `dose` column; text columns ignored."""
    import numpy as np


    def analyze(data, epoch, previous):
        table = data.read_csv()
        dose = table["dose"]
        dose = dose[~np.isnan(dose)]
        return {
            "count": int(dose.size),
            "sum": float(dose.sum()),
            "min": float(dose.min()) if dose.size else None,
            "max": float(dose.max()) if dose.size else None,
            "sites": sorted(set(table["site"].tolist())),
        }
'''

AGGREGATOR = """
    def aggregate(results, epoch, previous):
        present = [r for r in results.values() if r["count"]]
        count = sum(r["count"] for r in results.values())
        return {
            "count": count,
            "mean": sum(r["sum"] for r in present) / count,
            "min": min(r["min"] for r in present),
            "max": max(r["max"] for r in present),
            "sites": sorted({s for r in results.values() for s in r["sites"]}),
            "nodes": sorted(results),
        }


    def converged(current, previous, epoch):
        return previous is not None and current == previous
"""

MAIN = """
    import json
    import sys

    import flame
    from aggregator_generic import aggregate, converged
    from analyzer_generic import analyze

    if __name__ == "__main__":
        try:
            result = flame.run(analyze=analyze, aggregate=aggregate, converged=converged)
        except flame.FlameError as exc:
            print(f"flame: error: {exc}", file=sys.stderr)
            sys.exit(1)
        print(json.dumps(result, default=str))
"""


def write_analysis(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "analyzer_generic.py").write_text(textwrap.dedent(ANALYZER))
    (folder / "aggregator_generic.py").write_text(textwrap.dedent(AGGREGATOR))
    (folder / "main_generic.py").write_text(textwrap.dedent(MAIN))
    return folder


def write_data(root: Path, seed: int = 11) -> dict[str, list[Path]]:
    rng = np.random.default_rng(seed)
    layout = {"hospital-1": [40, 13], "hospital-2": [7], "lab.3": [120, 1, 30]}
    written: dict[str, list[Path]] = {}
    for node, sizes in layout.items():
        for index, size in enumerate(sizes):
            path = root / node / f"part_{index}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            dose = rng.normal(50, 20, size=size)
            blank = rng.random(size) < 0.1
            rows = ["site,dose"] + [
                f"{node}-{i % 3},{'' if b else repr(float(d))}"
                for i, (d, b) in enumerate(zip(dose, blank, strict=True))
            ]
            path.write_text("\n".join(rows) + "\n")
            written.setdefault(node, []).append(path)
    return written


def test_separately_written_template_analysis(tmp_path: Path) -> None:
    analysis = write_analysis(tmp_path / "my_analysis")
    files = write_data(tmp_path / "data")
    output = tmp_path / "result.json"
    run = flame(
        "simulate", analysis, "--data", tmp_path / "data", "--epochs", "5", "--output", output
    )
    assert run.returncode == 0, run.stderr

    pooled = read_columns([p for paths in files.values() for p in paths], {"dose"})["dose"]
    dose = pooled[~np.isnan(pooled)]
    sites = sorted({row["site"] for paths in files.values() for p in paths
                    for row in csv.DictReader(p.open())})  # fmt: skip
    document = json.loads(output.read_text())
    result = document["result"]
    assert result["count"] == dose.size
    assert result["min"] == dose.min() and result["max"] == dose.max()
    assert abs(result["mean"] - dose.mean()) <= 1e-9 * max(1.0, abs(dose.mean()))
    assert result["sites"] == sites
    assert result["nodes"] == sorted(files)
    # converged() stops the run once the aggregate repeats: after the second epoch
    assert document["epochs"] == 2 and document["converged"] is True
    assert [h["nodes"] for h in document["history"]] == [sorted(files)] * 2


def test_seed_makes_runs_reproducible(tmp_path: Path) -> None:
    analysis = tmp_path / "noisy.py"
    analysis.write_text(
        textwrap.dedent(
            """
            import flame

            def analyze(data):
                return flame.context().rng.normal(size=3).tolist()

            def aggregate(results):
                return results
            """
        )
    )
    write_data(tmp_path / "data")
    outputs = [
        flame("simulate", analysis, "--data", tmp_path / "data", "--seed", seed, "--quiet")
        for seed in ("3", "3", "4")
    ]
    assert all(run.returncode == 0 for run in outputs), [run.stderr for run in outputs]
    values = [json.loads(run.stdout) for run in outputs]
    assert values[0] == values[1] != values[2]


def test_flame_epochs_from_the_environment(tmp_path: Path) -> None:
    analysis = write_analysis(tmp_path / "a")
    write_data(tmp_path / "data")
    output = tmp_path / "r.json"
    run = flame(
        "simulate", analysis, "--data", tmp_path / "data", "--output", output,
        env=clean_env(FLAME_EPOCHS="1"),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert json.loads(output.read_text())["epochs"] == 1


# --- bad input: one clear line, exit != 0, no traceback, within seconds ----------------------


def test_invalid_config_value(tmp_path: Path) -> None:
    run = flame("simulate", EXAMPLE, "--data", EXAMPLE / "data", env=clean_env(FLAME_EPOCHS="abc"))
    assert run.returncode == 2
    assert_clean_failure(run, "FLAME_EPOCHS", "abc")


def test_two_invalid_config_values_give_two_lines() -> None:
    run = flame(
        "simulate",
        EXAMPLE,
        "--data",
        EXAMPLE / "data",
        env=clean_env(FLAME_EPOCHS="abc", FLAME_EPOCH_TIMEOUT="soon"),
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr
    errors = [line for line in lines(run.stderr) if line.startswith("flame:")]
    assert len(errors) == 2
    assert any("FLAME_EPOCHS" in e for e in errors)
    assert any("FLAME_EPOCH_TIMEOUT" in e for e in errors)


def test_invalid_epochs_flag() -> None:
    run = flame("simulate", EXAMPLE, "--data", EXAMPLE / "data", "--epochs", "0")
    assert run.returncode == 2
    assert_clean_failure(run, "FLAME_EPOCHS")


def test_missing_analyzer_function(tmp_path: Path) -> None:
    folder = write_analysis(tmp_path / "no_analyzer")
    (folder / "analyzer_generic.py").write_text("# analyze() was deleted by mistake\n")
    (folder / "main_generic.py").unlink()
    write_data(tmp_path / "data")
    run = flame("simulate", folder, "--data", tmp_path / "data")
    assert_clean_failure(run, "analyze")


def test_analyzer_raising_on_one_node(tmp_path: Path) -> None:
    analysis = tmp_path / "fragile.py"
    analysis.write_text(
        textwrap.dedent(
            """
            import flame

            def check_doses(node):
                if node == "hospital-2":
                    raise ValueError("dose column has negative values")

            def analyze(data):
                check_doses(flame.context().node_id)
                return 1

            def aggregate(results):
                return sum(results.values())
            """
        )
    )
    write_data(tmp_path / "data")
    started = time.monotonic()
    run = flame("simulate", analysis, "--data", tmp_path / "data")  # default timeouts: minutes
    elapsed = time.monotonic() - started
    assert elapsed < 20, elapsed
    assert run.returncode == 1
    # One error line, and once the analyst's traceback: their frames only, not flame's.
    errors = [line for line in lines(run.stderr) if line.startswith("flame:")]
    assert len(errors) == 1, run.stderr
    for fragment in ("hospital-2", "ValueError", "negative values"):
        assert fragment in errors[0], run.stderr
    assert run.stderr.count("Traceback (most recent call last)") == 1, run.stderr
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\w+)', run.stderr)
    assert [(Path(f).name, int(n), fn) for f, n, fn in frames] == [
        ("fragile.py", 9, "analyze"),
        ("fragile.py", 6, "check_doses"),
    ], run.stderr


def test_node_folder_without_files(tmp_path: Path) -> None:
    write_data(tmp_path / "data")
    (tmp_path / "data" / "empty_node").mkdir()
    (tmp_path / "data" / "empty_node" / ".DS_Store").write_text("hidden files do not count")
    run = flame("simulate", EXAMPLE, "--data", tmp_path / "data")
    assert_clean_failure(run, "empty_node")


def test_node_folder_with_an_invalid_name(tmp_path: Path) -> None:
    write_data(tmp_path / "data")
    bad = tmp_path / "data" / "bad name"
    bad.mkdir()
    (bad / "x.csv").write_text("site,dose\na,1\n")
    run = flame("simulate", EXAMPLE, "--data", tmp_path / "data")
    assert_clean_failure(run, "bad name")


def test_data_folder_that_does_not_exist(tmp_path: Path) -> None:
    run = flame("simulate", EXAMPLE, "--data", tmp_path / "nowhere")
    assert_clean_failure(run, "nowhere")


def test_data_folder_without_node_folders(tmp_path: Path) -> None:
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.csv").write_text("x\n1\n")
    run = flame("simulate", EXAMPLE, "--data", tmp_path / "flat")
    assert_clean_failure(run, "flat")


def test_analysis_that_does_not_exist(tmp_path: Path) -> None:
    run = flame("simulate", tmp_path / "missing_analysis", "--data", EXAMPLE / "data")
    assert_clean_failure(run, "missing_analysis")


def test_analysis_with_a_syntax_error(tmp_path: Path) -> None:
    analysis = tmp_path / "broken.py"
    analysis.write_text("def analyze(data:\n")
    run = flame("simulate", analysis, "--data", EXAMPLE / "data")
    assert_clean_failure(run, "broken.py", "SyntaxError")


@pytest.mark.parametrize("module", ["flame", "json"])
def test_analysis_file_named_like_an_installed_module(tmp_path: Path, module: str) -> None:
    folder = tmp_path / "shadow"
    folder.mkdir()
    (folder / f"{module}.py").write_text(
        "def analyze(data):\n    return 1\n\ndef aggregate(results):\n"
        "    return sum(results.values())\n"
    )
    run = flame("simulate", folder, "--data", EXAMPLE / "data", "--quiet")
    assert "Traceback" not in run.stderr, run.stderr
    if run.returncode == 0:
        assert json.loads(run.stdout) == len(list((EXAMPLE / "data").iterdir()))
    else:
        assert_clean_failure(run, f"{module}.py")


def test_mismatched_csv_headers_on_a_node(tmp_path: Path) -> None:
    files = write_data(tmp_path / "data")
    files["lab.3"][1].write_text("site,amount\nx,1\n")
    run = flame("simulate", EXAMPLE, "--data", tmp_path / "data")
    assert_clean_failure(run, "lab.3", "part_1.csv")


def test_output_in_a_missing_folder(tmp_path: Path) -> None:
    run = flame(
        "simulate", EXAMPLE, "--data", EXAMPLE / "data", "--output", tmp_path / "no" / "r.json"
    )
    assert_clean_failure(run, "r.json")


def test_malformed_json_section_variable() -> None:
    run = flame("simulate", EXAMPLE, "--data", EXAMPLE / "data", env=clean_env(FLAME_BROKER="{bad"))
    assert_clean_failure(run, "FLAME_BROKER")


def test_flags_override_the_environment(tmp_path: Path) -> None:
    output = tmp_path / "r.json"
    run = flame(
        "simulate", EXAMPLE, "--data", EXAMPLE / "data", "--epochs", "2", "--output", output,
        env=clean_env(FLAME_EPOCHS="abc"),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert json.loads(output.read_text())["epochs"] == 2


def test_timeout_flag_is_validated() -> None:
    run = flame("simulate", EXAMPLE, "--data", EXAMPLE / "data", "--timeout", "0")
    assert run.returncode == 2
    assert_clean_failure(run, "FLAME_EPOCH_TIMEOUT")


# --- flame run: a node's role needs its config -----------------------------------------------


def test_run_without_node_config_lists_every_missing_setting() -> None:
    run = flame("run", EXAMPLE)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    errors = [line for line in lines(run.stderr) if line.startswith("flame:")]
    for variable in ("FLAME_NODE_ID", "FLAME_ROLE", "FLAME_PARTICIPANTS", "FLAME_BROKER__URL"):
        assert sum(variable in line for line in errors) == 1, (variable, run.stderr)


def test_run_analysis_node_must_be_a_participant() -> None:
    env = clean_env(
        FLAME_ROLE="analysis",
        FLAME_NODE_ID="outsider",
        FLAME_PARTICIPANTS="a,b",
        FLAME_BROKER__URL="mqtt://127.0.0.1:1",
    )
    run = flame("run", EXAMPLE, env=env)
    assert run.returncode == 2
    assert_clean_failure(run, "FLAME_NODE_ID", "outsider")


# --- progress display ------------------------------------------------------------------------


class FakeTerminal:
    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.text = ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("tty", [True, False])
def test_progress_lines(tty: bool) -> None:
    from flame.aggregator.records import EpochRecord, Event
    from flame.cli.app import _Progress

    stream = FakeTerminal(tty)
    progress = _Progress(stream)  # type: ignore[arg-type]
    record = EpochRecord(0, ["a", "b"], ["c"], started=0.0, duration=1.25, converged=True)
    progress(Event("epoch_started", 0, expected=3))
    progress(Event("result", 0, node="a", received=1, expected=3))
    progress(Event("epoch_finished", 0, record=record, received=2))
    final = stream.text.split("\r\x1b[K")[-1] if tty else stream.text
    assert final == "epoch 0: 2 nodes answered (a, b), missing c in 1.250 s, converged\n"
    if tty:
        assert "1/3 answered" in stream.text
    else:
        assert "\r" not in stream.text and "\x1b" not in stream.text


def test_quorum_larger_than_the_nodes() -> None:
    run = flame("simulate", EXAMPLE, "--data", EXAMPLE / "data", env=clean_env(FLAME_QUORUM="7"))
    assert_clean_failure(run, "FLAME_QUORUM", "7")


def test_output_is_strict_json_even_with_nan(tmp_path: Path) -> None:
    analysis = tmp_path / "nan.py"
    analysis.write_text(
        "def analyze(data):\n    return float('nan')\n\n"
        "def aggregate(results):\n    return {'mean': float('nan'), 'max': float('inf')}\n"
    )
    output = tmp_path / "r.json"
    run = flame("simulate", analysis, "--data", EXAMPLE / "data", "--output", output, "--quiet")
    assert run.returncode == 0, run.stderr

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    json.loads(output.read_text(), parse_constant=refuse)
    json.loads(run.stdout, parse_constant=refuse)
