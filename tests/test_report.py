"""`flame report`: the run page, rendered by a real headless Chromium; the history as pandas.

The run behind the page is real: three nodes over three epochs, one of which misses epoch 1
(quorum 2, its `analyze` sleeps past the epoch deadline), with an aggregate that moves.
Chromium (Debian's `chromium` package; .ci/run installs it) loads the file with networking
off, a script injected into a copy measures every chart after layout, and the screenshot is
kept under pytest's tmp folder (its path is printed).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import flame
from flame.config import load_config
from flame.ops.report import load_run, render

NODES = {
    "a": {"x.csv": "v\n1\n2\n3\n"},
    "b": {"x.csv": "v\n10\n"},
    "c": {"x.csv": "v\n4\n5\n"},
}


def analyze(data, epoch, previous):
    if data.node_id == "c" and epoch == 1:
        time.sleep(1.6)  # past the epoch deadline: c is missing from epoch 1
    values = [float(row["v"]) for row in data.rows("x.csv")]
    shift = 0.0 if previous is None else previous["mean"] / 2
    return {"n": len(values), "sum": sum(v - shift for v in values), "tag": "x"}


def aggregate(results, epoch, previous):
    n = sum(r["n"] for r in results.values())
    return {"n": n, "mean": sum(r["sum"] for r in results.values()) / n, "nodes": len(results)}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[flame.RunResult, Path]:
    store = tmp_path_factory.mktemp("results")
    config = load_config(
        analysis_id="report-run",
        epochs=3,
        quorum=2,
        epoch_timeout=1.0,
        presence_timeout=20,
        storage={"results_dir": store},
    )
    return flame.simulate(analyze, aggregate, data=NODES, config=config), store


def _document(result: flame.RunResult) -> dict:
    return json.loads(
        json.dumps({**result.to_dict(), "manifest": {"participants": ["a", "b", "c"]}})
    )


def test_the_history_records_arrivals_sizes_and_the_aggregates_numbers(run) -> None:
    result, _ = run
    assert [h.missing for h in result.history] == [[], ["c"], []]
    first, second = result.history[0], result.history[1]
    assert set(first.arrivals) == {"a", "b", "c"} and set(second.arrivals) == {"a", "b"}
    assert all(0 <= t <= first.duration for t in first.arrivals.values())
    assert all(size > 50 for size in first.result_bytes.values())
    assert first.summary == {"n": 6.0, "mean": 25 / 6, "nodes": 3.0}
    assert second.summary["nodes"] == 2.0  # epoch 1 was aggregated without c
    status_form = second.to_dict(summary=False)
    assert "summary" not in status_form and "arrivals_s" in status_form


def test_history_frame_is_one_row_per_epoch_and_node(run) -> None:
    pd = pytest.importorskip("pandas")
    frame = run[0].history_frame()
    assert isinstance(frame, pd.DataFrame)
    assert len(frame) == 9
    missing = frame[frame.state == "missing"]
    assert missing[["epoch", "node"]].values.tolist() == [[1, "c"]]
    assert missing.arrival_s.isna().all()
    answered = frame[frame.state == "answered"]
    assert (answered.arrival_s >= 0).all() and (answered.result_bytes > 0).all()


def test_the_page_holds_every_chart_and_loads_nothing(run) -> None:
    page = render(_document(run[0]))
    assert page.count('data-chart="timeline"') == 1
    assert len(re.findall(r'class="cell answered" data-node="\w" data-epoch="\d"', page)) == 8
    assert re.search(r'class="cell missing" data-node="c" data-epoch="1"', page)
    fields = set(re.findall(r'data-chart="convergence" data-field="([^"]+)"', page))
    assert fields == {"n", "mean", "nodes"}
    for chart in ("durations", "bytes", "arrivals"):
        assert f'data-chart="{chart}"' in page
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<script" not in page


def test_failures_and_unknown_sections_render_generically() -> None:
    document = {
        "analysis_id": "x<y>",
        "history": [{"epoch": 0, "nodes": ["a"], "missing": [], "duration_s": 0.5}],
        "failure": {"node": "b", "epoch": 1, "reason": "ValueError: <bad>"},
        "privacy": {"epsilon_spent": 0.5, "budget": 1.0},
        "manifest": {"policy": {"min_rows": 10}},
    }
    page = render(document)
    assert 'class="cell failed" data-node="b" data-epoch="1"' in page
    assert "ValueError: &lt;bad&gt;" in page and "x&lt;y&gt;" in page
    assert '<h3 class="highlight">privacy</h3>' in page and "epsilon_spent" in page
    assert '<h3 class="highlight">policy</h3>' in page and "min_rows" in page


def test_report_by_analysis_id_reads_the_stored_run(run, tmp_path) -> None:
    _, store = run
    out = tmp_path / "by-id.html"
    env = {**os.environ, "FLAME_STORAGE__RESULTS_DIR": str(store)}
    done = subprocess.run(
        [sys.executable, "-m", "flame", "report", "report-run", "--out", str(out)],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    page = out.read_text()
    manifest = json.loads((store / "report-run" / "final" / "manifest.json").read_text())
    assert manifest["code_sha256"] in page
    assert 'data-field="mean"' in page and 'class="cell missing" data-node="c"' in page
    assert 'data-chart="aggregate"' in page and "<th>converged</th>" not in page  # none given
    document = load_run("report-run", config=load_config(storage={"results_dir": store}))
    assert [h["missing"] for h in document["history"]] == [[], ["c"], []]


def test_bad_sources_are_clear_errors(tmp_path) -> None:
    (tmp_path / "not-a-run.json").write_text('{"result": 1}')
    for source, message in (
        (tmp_path / "nope.json", "no such file"),
        (tmp_path / "not-a-run.json", "not a run result"),
        ("some-analysis", "no storage is configured"),
    ):
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLAME_")}
        done = subprocess.run(
            [sys.executable, "-m", "flame", "report", str(source), "--out", tmp_path / "r.html"],
            capture_output=True, text=True, timeout=60, env=env,
        )  # fmt: skip
        assert done.returncode == 1 and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


# --------------------------------------------------------------------------- in Chromium

MEASURE = """<script>
for (const svg of document.querySelectorAll('svg.chart')) {
  const box = svg.getBoundingClientRect();
  const marks = svg.querySelectorAll('rect.cell, rect.bar, polyline, circle').length;
  const size = Math.round(box.width) + 'x' + Math.round(box.height);
  svg.setAttribute('data-rendered', size + 'x' + marks);
}
document.body.setAttribute('data-measured', document.querySelectorAll('svg.chart').length);
</script>"""


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("chromium is not installed (Debian package 'chromium'; .ci/run installs it)")
    return found


def _headless(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args,
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_flame_report_renders_in_headless_chromium(run, tmp_path, capsys) -> None:
    chromium = _chromium()
    source = tmp_path / "result.json"
    source.write_text(json.dumps(_document(run[0])))
    page = tmp_path / "report.html"
    done = subprocess.run(
        [sys.executable, "-m", "flame", "report", str(source), "--out", str(page)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr

    # Layout: a copy with a measuring script (the report itself runs none; its CSP forbids it).
    probe = tmp_path / "probe.html"
    html = page.read_text()
    html = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", html)
    probe.write_text(html.replace("</body>", MEASURE + "</body>"))
    dom = _headless(chromium, tmp_path / "profile", "--dump-dom", probe.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    charts = re.findall(
        r'<svg class="chart" data-chart="(\w+)"[^>]*data-rendered="(\d+)x(\d+)x(\d+)"', dom.stdout
    )
    assert re.search(r'data-measured="(\d+)"', dom.stdout).group(1) == str(len(charts))
    kinds = [kind for kind, *_ in charts]
    assert kinds.count("timeline") == 1 and kinds.count("convergence") == 3
    assert {"durations", "bytes", "arrivals"} <= set(kinds)
    for kind, width, height, marks in charts:
        assert int(width) > 100 and int(height) > 50, (kind, width, height)
        assert int(marks) > 0, kind
    timeline = next(c for c in charts if c[0] == "timeline")
    assert int(timeline[3]) == 9  # 3 nodes x 3 epochs

    # The page itself, as an analyst opens it: a screenshot kept as the test's artifact.
    shot = tmp_path / "report.png"
    blank = tmp_path / "blank.png"
    (tmp_path / "blank.html").write_text("<!DOCTYPE html><html><body></body></html>")
    for target, url in ((shot, page.as_uri()), (blank, (tmp_path / "blank.html").as_uri())):
        taken = _headless(
            chromium, tmp_path / "profile", f"--screenshot={target}", "--window-size=1200,1600", url
        )
        assert taken.returncode == 0 and target.is_file(), taken.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 5 * blank.stat().st_size  # charts and text, not a blank page
    with capsys.disabled():  # the artifact's path, shown even when the test passes
        print(f"\nflame report screenshot: {shot}")


def test_a_failed_simulation_still_writes_its_history_and_the_page_shows_the_failure(
    tmp_path,
) -> None:
    analysis = tmp_path / "analysis.py"
    analysis.write_text(
        "def analyze(data, epoch):\n"
        "    if epoch == 1 and data.node_id == 'b':\n"
        "        raise ValueError('no rows left')\n"
        "    return {'n': epoch}\n\n"
        "def aggregate(results):\n"
        "    return {'total': sum(r['n'] for r in results.values())}\n"
    )
    for node in ("a", "b"):
        (tmp_path / "data" / node).mkdir(parents=True)
        (tmp_path / "data" / node / "x.csv").write_text("v\n1\n")
    output, page = tmp_path / "failed.json", tmp_path / "failed.html"
    failed = subprocess.run(
        [sys.executable, "-m", "flame", "simulate", analysis, "--data", tmp_path / "data",
         "--epochs", "3", "--output", output, "--in-process", "--quiet"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert failed.returncode == 1 and "no rows left" in failed.stderr
    document = json.loads(output.read_text())
    assert document["failure"]["node"] == "b" and document["failure"]["epoch"] == 1
    assert [h["epoch"] for h in document["history"]] == [0]
    done = subprocess.run(
        [sys.executable, "-m", "flame", "report", output, "--out", page],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    html = page.read_text()
    assert 'class="cell failed" data-node="b" data-epoch="1"' in html
    assert 'class="cell answered" data-node="b" data-epoch="0"' in html
    assert "no rows left" in html and ">failed<" in html


def test_privacy_reports_of_the_nodes_get_their_own_section() -> None:
    history = [
        {
            "epoch": e,
            "nodes": ["a", "b"],
            "missing": [],
            "duration_s": 0.1,
            "privacy": {
                "a": {"spend": {"epsilon": 0.5, "delta": 0.0}, "suppressed": {"hist": 2}},
                "b": {"spend": {"epsilon": 0.5, "delta": 0.0},
                      "spent_total": {"epsilon": 0.5 * (e + 1), "delta": 0.0}},
            },
        }
        for e in range(3)
    ]  # fmt: skip
    page = render({"analysis_id": "dp", "history": history})
    assert 'data-chart="privacy"' in page
    assert re.search(r'data-series="a"[^>]*points="[^"]+"', page)
    assert "suppressed" in page and "spent_total" in page
    assert render({"history": []}).count('id="privacy"') == 0


def test_an_unfinished_run_is_reported_from_its_last_checkpoint(tmp_path) -> None:
    store = tmp_path / "results"

    def failing(data, epoch, previous):
        if epoch == 2:
            raise ValueError("stop here")
        return analyze(data, epoch, previous)

    config = load_config(
        analysis_id="cut-short", epochs=4, epoch_timeout=20, storage={"results_dir": store}
    )
    with pytest.raises(flame.RunFailed):
        flame.simulate(failing, aggregate, data=NODES, config=config)
    document = load_run("cut-short", config=load_config(storage={"results_dir": store}))
    assert [h["epoch"] for h in document["history"]] == [0, 1]
    assert "after epoch 1" in document["unfinished"]
    page = render(document)
    assert "<span>unfinished</span>" in page and 'data-field="mean"' in page


def test_a_huge_run_draws_only_its_last_epochs() -> None:
    nodes = [f"n{i}" for i in range(500)]
    history = [{"epoch": e, "nodes": nodes, "missing": [], "duration_s": 0.1} for e in range(100)]
    page = render({"history": history})
    assert page.count('class="cell answered"') == 500 * 40  # 20,000 cells at most
    assert "the last 40 of 100 epochs are drawn" in page


# ------------------------------------------------------------------ readability (issue 23)


def _charts(page: str, kind: str) -> list[str]:
    return re.findall(rf'<svg class="chart" data-chart="{kind}"[^>]*>.*?</svg>', page, re.S)


def test_a_series_spanning_decades_is_drawn_on_a_log_scale() -> None:
    steps = [6.4, 0.3, 2e-4, 5e-8, 7e-12]
    history = [
        {"epoch": e, "nodes": ["a"], "missing": [], "duration_s": 0.1,
         "summary": {"step": s, "loss": 1.0 + e / 10}}
        for e, s in enumerate(steps)
    ]  # fmt: skip
    page = render({"history": history, "manifest": {"has_converged": True}})
    step = next(c for c in _charts(page, "convergence") if 'data-field="step"' in c)
    loss = next(c for c in _charts(page, "convergence") if 'data-field="loss"' in c)
    assert 'data-scale="log"' in step and 'data-scale="linear"' in loss
    ys = [float(y) for y in re.findall(r'<circle class="marker" cx="[\d.]+" cy="([\d.]+)"', step)]
    gaps = [b - a for a, b in itertools.pairwise(ys)]  # each epoch visibly lower
    assert min(gaps) > 15, gaps
    assert "1.000e-11" in step and "epoch · log scale" in step


def test_no_convergence_charts_for_one_epoch_or_an_analysis_without_converged() -> None:
    one = [{"epoch": 0, "nodes": ["a"], "missing": [], "duration_s": 0.1, "summary": {"m": 2.0}}]
    page = render({"history": one, "converged": False, "manifest": {"has_converged": False}})
    assert not _charts(page, "convergence") and not _charts(page, "aggregate")
    assert "nothing to chart over epochs" in page
    assert "converged" not in page.split('id="convergence"')[0].split('id="timeline"')[1]
    assert "<th>converged</th>" not in page  # not "converged False": it had no converged
    three = [{**one[0], "epoch": e, "summary": {"m": 2.0 + e}} for e in range(3)]
    page = render({"history": three, "converged": False, "manifest": {"has_converged": False}})
    assert not _charts(page, "convergence") and len(_charts(page, "aggregate")) == 1
    assert "The aggregate per epoch" in page and "<th>converged</th>" not in page
    page = render({"history": three, "converged": True, "manifest": {"has_converged": True}})
    assert len(_charts(page, "convergence")) == 1 and "<th>converged</th>" in page


def test_overlapping_series_are_told_apart() -> None:
    history = [
        {"epoch": e, "nodes": ["a", "b"], "missing": [], "duration_s": 0.1,
         "privacy": {n: {"spend": {"epsilon": 0.5}} for n in ("a", "b")}}
        for e in range(3)
    ]  # fmt: skip
    page = render({"history": history})
    chart = _charts(page, "privacy")[0]
    lines = re.findall(r'<polyline class="series" data-series="(\w)" data-offset="([\d.]+)"'
                       r'[^>]*?(?: stroke-dasharray="([^"]+)")? points="([^"]+)"', chart)
    assert [name for name, *_ in lines] == ["a", "b"]
    (_, off_a, dash_a, pts_a), (_, off_b, dash_b, pts_b) = lines
    assert pts_a != pts_b and float(off_b) > float(off_a)  # same values, drawn apart
    assert dash_a != dash_b  # and with their own dash pattern
    assert "<circle class=\"marker\"" in chart and "<rect class=\"marker\"" in chart
    legend = page.split('data-chart="privacy"')[0].rsplit('<div class="legend">', 1)[1]
    assert "stroke-dasharray" in legend and ">a</span>" in legend and ">b</span>" in legend
    # c shares only its first epochs with a and b (it stopped): still drawn apart from both
    history.append({"epoch": 3, "nodes": ["a", "b"], "missing": ["c"], "duration_s": 0.1,
                    "privacy": {n: {"spend": {"epsilon": 0.5}} for n in ("a", "b")}})
    for item in history[:3]:
        item["privacy"]["c"] = {"spend": {"epsilon": 0.5}}
    offsets = re.findall(r'data-series="(\w)" data-offset="([\d.]+)"', render({"history": history}))
    assert len({offset for _, offset in offsets}) == 3, offsets


def test_a_failed_runs_report_lists_its_participants_and_who_answered(tmp_path: Path) -> None:
    """Three nodes answer epoch 0 and are charged ε; the fourth fails in it afterwards."""
    analysis = tmp_path / "analysis.py"
    analysis.write_text(
        "import time\nimport flame\n\n"
        "def analyze(data, epoch):\n"
        "    if data.node_id == 'd':\n"
        "        time.sleep(2.0)\n"
        "        raise ValueError('d gives up')\n"
        "    return {'n': flame.dp.count('v', epsilon=0.5)}\n\n"
        "def aggregate(results):\n"
        "    return {'n': sum(r['n'] for r in results.values())}\n"
    )
    (tmp_path / "policy.toml").write_text(
        f'epsilon_budget = 3.0\nledger_dir = "{tmp_path / "ledger"}"\n'
    )
    for node in "abcd":
        (tmp_path / "data" / node).mkdir(parents=True)
        (tmp_path / "data" / node / "x.csv").write_text("v\n1\n2\n3\n")
    output = tmp_path / "failed.json"
    failed = subprocess.run(
        [sys.executable, "-m", "flame", "simulate", analysis, "--data", tmp_path / "data",
         "--policy", tmp_path / "policy.toml", "--output", output, "--in-process", "--quiet"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert failed.returncode == 1 and "d gives up" in failed.stderr, failed.stderr
    document = json.loads(output.read_text())
    assert document["manifest"]["participants"] == ["a", "b", "c", "d"]
    assert document["history"] == [] and document["failure"]["node"] == "d"
    answered = document["failed_epoch"]
    assert answered["epoch"] == 0 and answered["nodes"] == ["a", "b", "c"]
    assert {n: r["spend"]["epsilon"] for n, r in answered["privacy"].items()} == {
        "a": 0.5, "b": 0.5, "c": 0.5
    }
    html = render(load_run(output))
    assert "<span>4 node(s)</span>" in html and "3 of 4 results arrived" in html
    for node in "abc":
        assert f'class="cell answered" data-node="{node}" data-epoch="0"' in html
    assert 'class="cell failed" data-node="d" data-epoch="0"' in html
    assert 'data-chart="privacy"' in html


READABILITY_PROBE = """<script>
const tops = (sel) => Array.from(document.querySelectorAll(sel))
  .map(e => Math.round(e.getBoundingClientRect().top)).join(',');
document.body.setAttribute('data-step-markers', tops('svg[data-field="step"] .marker'));
document.body.setAttribute('data-privacy-lines', tops('svg[data-chart="privacy"] polyline'));
document.body.setAttribute('data-dashes', Array.from(
  document.querySelectorAll('svg[data-chart="privacy"] polyline'))
  .map(e => getComputedStyle(e).strokeDasharray).join('|'));
</script>"""


def test_the_readability_fixes_hold_in_headless_chromium(tmp_path) -> None:
    """Laid out by a browser: log-scale points are apart, overlapping series are apart."""
    chromium = _chromium()
    history = [
        {"epoch": e, "nodes": ["a", "b"], "missing": [], "duration_s": 0.1,
         "summary": {"step": s},
         "privacy": {n: {"spend": {"epsilon": 0.5}} for n in ("a", "b")}}
        for e, s in enumerate([6.4, 0.3, 2e-4, 5e-8, 7e-12])
    ]  # fmt: skip
    document = {
        "history": history,
        "failed_epoch": {"epoch": 5, "nodes": ["a"], "missing": ["b"]},
        "failure": {"node": "b", "epoch": 5, "reason": "b stopped"},
        "manifest": {"participants": ["a", "b"], "has_converged": True},
    }
    probe = tmp_path / "probe.html"
    html = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", render(document))
    probe.write_text(html.replace("</body>", READABILITY_PROBE + "</body>"))
    dom = _headless(chromium, tmp_path / "profile", "--dump-dom", probe.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    steps = [int(v) for v in re.search(r'data-step-markers="([\d,]+)"', dom.stdout)[1].split(",")]
    assert len(steps) == 5 and all(b - a > 10 for a, b in itertools.pairwise(steps)), steps
    lines = [int(v) for v in re.search(r'data-privacy-lines="([\d,]+)"', dom.stdout)[1].split(",")]
    assert len(lines) == 2 and lines[0] != lines[1], lines
    dashes = re.search(r'data-dashes="([^"]*)"', dom.stdout)[1].split("|")
    assert len(set(dashes)) == 2, dashes
    assert "11 of 12 results arrived" in dom.stdout
