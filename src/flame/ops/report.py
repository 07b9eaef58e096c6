"""`flame report`: a run as one self-contained HTML page, for people who would rather look.

Input is what a run leaves behind: the JSON of `flame simulate --output` or, by analysis id,
the manifest, final result and epoch aggregates in the configured storage. The page shows
the epoch timeline per node (answered / missing / failed, arrival time, result size), epoch
durations and bytes, the convergence of every numeric field of the aggregate, the manifest
(code hash, participants, config) and whatever further sections the run recorded (policy,
privacy spend, ...) rendered generically. Charts are inline SVG; the page loads nothing (a
Content-Security-Policy forbids it) and runs no script.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from flame.ops.report_charts import (
    MAX_CELLS,
    _bar_chart,
    _bytes,
    _e,
    _finite,
    _legend,
    _line_chart,
    _nodes,
    _num,
    _records,
    _timeline,
)
from flame.ops.report_load import load_run

__all__ = ["load_run", "render", "write_report"]

MAX_FIELDS = 24  # convergence charts on one page
MAX_RESULT_CHARS = 50_000
_KNOWN = {
    "analysis_id",
    "result",
    "converged",
    "epochs",
    "history",
    "location",
    "manifest",
    "failed_epoch",  # drawn with the epochs (`_records`)
}
_HIGHLIGHT = re.compile(r"policy|privacy|dp|spend|budget|epsilon|delta", re.IGNORECASE)


def write_report(source: str | Path, out: Path, *, config: Any = None) -> Path:
    """Render `source` (file or analysis id) into the HTML file `out`."""
    out.write_text(render(load_run(source, config=config)), encoding="utf-8")
    return out


# ------------------------------------------------------------------------------- sections


def _tree(value: Any, depth: int = 0) -> str:
    """Any JSON value as nested tables (escaped)."""
    if isinstance(value, dict) and value and depth < 6:
        rows = "".join(
            f"<tr><th>{_e(k)}</th><td>{_tree(v, depth + 1)}</td></tr>" for k, v in value.items()
        )
        return f'<table class="kv">{rows}</table>'
    if isinstance(value, list) and value and all(not isinstance(v, (dict, list)) for v in value):
        text = ", ".join(str(v) for v in value[:200])
        return _e(text + (f" … ({len(value)} in all)" if len(value) > 200 else ""))
    if isinstance(value, (dict, list)):
        text = json.dumps(value, default=str)
        return f"<code>{_e(text[:2000])}</code>"
    if isinstance(value, float):
        return _e(_num(value))
    return _e(value)


def _manifest_of(document: dict[str, Any]) -> dict[str, Any]:
    manifest = document.get("manifest")
    return manifest if isinstance(manifest, dict) else {}


def _manifest_section(document: dict[str, Any]) -> str:
    manifest = document.get("manifest") if isinstance(document.get("manifest"), dict) else {}
    manifest = dict(manifest or {})
    config = manifest.pop("config", None)
    has_converged = manifest.pop("has_converged", None)
    facts: dict[str, Any] = {
        "analysis id": document.get("analysis_id"),
        "code SHA-256": manifest.pop("code_sha256", None),
        "participants": manifest.pop("participants", None),
        "flame version": manifest.pop("flame_version", None),
        "created": manifest.pop("created", None),
        "epochs": document.get("epochs"),
        # an analysis without `converged` runs its epochs: "converged False" would mislead
        "converged": document.get("converged") if has_converged is not False else None,
        "result location": document.get("location"),
    }
    manifest.pop("analysis_id", None)
    manifest.pop("epochs", None)
    manifest.pop("converged", None)
    out = [
        '<section id="manifest"><h2>Manifest</h2>',
        _tree({k: v for k, v in facts.items() if v is not None}),
    ]
    further = {**manifest, **{k: v for k, v in document.items() if k not in _KNOWN}}
    for key in sorted(further, key=lambda k: (not _HIGHLIGHT.search(k), k)):
        css = ' class="highlight"' if _HIGHLIGHT.search(key) else ""
        out.append(f"<h3{css}>{_e(key)}</h3>{_tree(further[key])}")
    if config is not None:
        out.append(f"<details><summary>configuration</summary>{_tree(config)}</details>")
    out.append("</section>")
    return "".join(out)


def _convergence_section(records: list[dict[str, Any]], has_converged: Any) -> str:
    """The aggregate's numbers over the epochs: "convergence" only when the analysis has a
    `converged` (unknown, for older documents: as before); nothing to draw for one epoch."""
    converging = has_converged is not False
    title = "Convergence of the aggregate" if converging else "The aggregate per epoch"
    kind = "convergence" if converging else "aggregate"
    epochs = [item for item in records if isinstance(item.get("summary"), dict)]
    if len(epochs) < 2:
        return (
            f'<section id="convergence"><h2>{title}</h2><p class="note">'
            f"{len(epochs)} epoch(s) with a numeric aggregate: nothing to chart over epochs "
            "(the final result is below).</p></section>"
        )
    fields: dict[str, list[tuple[float, float]]] = {}
    for i, item in enumerate(records):
        summary = item.get("summary")
        if not isinstance(summary, dict):
            continue
        for name, value in summary.items():
            number = _finite(value)
            if number is not None and (name in fields or len(fields) < MAX_FIELDS):
                fields.setdefault(str(name), []).append((float(item.get("epoch", i)), number))
    out = [f'<section id="convergence"><h2>{title}</h2>']
    if not fields:
        out.append(
            '<p class="note">This run recorded no numeric aggregate per epoch (runs from '
            "before flame recorded epoch summaries, or an aggregate without numbers).</p>"
        )
    else:
        out.append('<div class="grid">')
        for name, values in fields.items():
            first, last = values[0][1], values[-1][1]
            out.append(
                f'<figure><figcaption>{_e(name)} <span class="muted">{_e(_num(first))} → '
                f"{_e(_num(last))}</span></figcaption>"
                + _line_chart(
                    {name: values},
                    chart=kind,
                    title=name,
                    extra=f' data-field="{_e(name)}"',
                )
                + "</figure>"
            )
        out.append("</div>")
    out.append("</section>")
    return "".join(out)


def _epochs_section(
    document: dict[str, Any], records: list[dict[str, Any]], nodes: list[str]
) -> str:
    out = ['<section id="timeline"><h2>Epochs per node</h2>']
    out.append(
        '<div class="legend"><span class="key"><i class="answered"></i>answered</span>'
        '<span class="key"><i class="missing"></i>missing</span>'
        '<span class="key"><i class="failed"></i>failed</span>'
        '<span class="key"><i class="absent"></i>not asked</span></div>'
    )
    out.append(f'<div class="scroll">{_timeline(document, records, nodes)}</div>')
    shown = max(1, MAX_CELLS // max(1, len(nodes)))
    if len(records) > shown:
        out.append(f'<p class="note">the last {shown} of {len(records)} epochs are drawn</p>')
    failure = document.get("failure")
    if isinstance(failure, dict):
        out.append(f'<p class="failed-text">Run failed: {_e(failure.get("reason", ""))}</p>')
    arrivals: dict[str, list[tuple[float, float]]] = {}
    for i, item in enumerate(records):
        for node, seconds in (item.get("arrivals_s") or {}).items():
            number = _finite(seconds)
            if number is not None:
                arrivals.setdefault(str(node), []).append((float(item.get("epoch", i)), number))
    durations = [
        (int(item.get("epoch", i)), float(item["duration_s"]))
        for i, item in enumerate(records)
        if _finite(item.get("duration_s")) is not None
    ]
    received = [
        (int(item.get("epoch", i)), float(item.get("bytes_received", 0)))
        for i, item in enumerate(records)
    ]
    sent = [
        (int(item.get("epoch", i)), float(item.get("bytes_sent", 0)))
        for i, item in enumerate(records)
    ]
    out.append('<div class="grid">')
    out.append(
        "<figure><figcaption>Epoch duration (s)</figcaption>"
        + _bar_chart({"duration": durations}, chart="durations", title="epoch duration")
        + "</figure>"
    )
    out.append(
        "<figure><figcaption>Bytes per epoch at the aggregator</figcaption>"
        + _legend(["received", "sent"])
        + _bar_chart({"received": received, "sent": sent}, chart="bytes", title="bytes", fmt=_bytes)
        + "</figure>"
    )
    arrivals = dict(sorted(arrivals.items()))
    if arrivals:
        out.append(
            "<figure><figcaption>Result arrival after the epoch started (s)</figcaption>"
            + _legend(arrivals, lines=True)
            + _line_chart(arrivals, chart="arrivals", title="arrival per node", unit=" s")
            + "</figure>"
        )
    out.append("</div>")
    out.append(_epoch_table(records, nodes, _manifest_of(document).get("has_converged")))
    out.append("</section>")
    return "".join(out)


def _privacy_section(records: list[dict[str, Any]], nodes: list[str]) -> str:
    """Per-epoch privacy reports of the nodes (DP spend, suppressed cells), when recorded."""
    if not any(isinstance(item.get("privacy"), dict) and item["privacy"] for item in records):
        return ""
    spenders = {
        str(k) for item in records if isinstance(item.get("privacy"), dict) for k in item["privacy"]
    }
    nodes = [*nodes, *sorted(spenders - set(nodes))]  # the aggregator's own (central DP) too
    totals: dict[str, list[tuple[float, float]]] = {}
    running: dict[str, float] = {}
    rows = []
    for i, item in enumerate(records):
        epoch = item.get("epoch", i)
        privacy = item.get("privacy") if isinstance(item.get("privacy"), dict) else {}
        cells = []
        for node in nodes:
            report = (privacy or {}).get(node)
            if not isinstance(report, dict):
                cells.append("<td></td>")
                continue
            spend = report.get("spend") if isinstance(report.get("spend"), dict) else {}
            epsilon = _finite((spend or {}).get("epsilon")) or 0.0
            total = report.get("spent_total")
            total_eps = _finite(total.get("epsilon")) if isinstance(total, dict) else None
            running[node] = total_eps if total_eps is not None else running.get(node, 0) + epsilon
            totals.setdefault(node, []).append((float(epoch), running[node]))
            cells.append(f"<td>{_tree(report)}</td>")
        rows.append(f"<tr><th>{_e(epoch)}</th>{''.join(cells)}</tr>")
    head = "".join(f"<th>{_e(n)}</th>" for n in nodes)
    chart = ""
    if any(v for values in totals.values() for _, v in values):
        chart = (
            '<div class="grid"><figure><figcaption>Privacy budget spent per node (ε, '
            "cumulative)</figcaption>"
            + _legend(totals, lines=True)
            + _line_chart(totals, chart="privacy", title="epsilon spent per node")
            + "</figure></div>"
        )
    return (
        '<section id="privacy"><h2 class="highlight">Privacy per epoch</h2>'
        f'{chart}<details><summary>per node and epoch</summary><table class="epochs">'
        f"<tr><th>epoch</th>{head}</tr>{''.join(rows)}</table></details></section>"
    )


def _epoch_table(records: list[dict[str, Any]], nodes: list[str], has_converged: Any) -> str:
    head = "".join(f"<th>{_e(n)}</th>" for n in nodes)
    converging = has_converged is not False  # no column for an analysis without converged
    rows = []
    for item in records[-200:]:
        cells = []
        for node in nodes:
            if node in (item.get("nodes") or []):
                arrival = (item.get("arrivals_s") or {}).get(node)
                size = (item.get("result_bytes") or {}).get(node)
                text = "✓"
                if isinstance(arrival, (int, float)):
                    text += f" {arrival:.3f} s"
                if isinstance(size, int):
                    text += f" · {_bytes(size)}"
                cells.append(f'<td class="answered-text">{_e(text)}</td>')
            elif node in (item.get("missing") or []):
                cells.append('<td class="missing-text">missing</td>')
            else:
                cells.append("<td></td>")
        duration = _finite(item.get("duration_s"))
        rows.append(
            f"<tr><th>{_e(item.get('epoch'))}</th>{''.join(cells)}"
            f"<td>{'' if duration is None else f'{duration:.3f} s'}</td>"
            f"<td>{_bytes(float(item.get('bytes_received', 0)))} / "
            f"{_bytes(float(item.get('bytes_sent', 0)))}</td>"
            + (f"<td>{'yes' if item.get('converged') else ''}</td>" if converging else "")
            + "</tr>"
        )
    note = f'<p class="note">last 200 of {len(records)} epochs</p>' if len(records) > 200 else ""
    return (
        '<details><summary>table</summary><table class="epochs"><tr><th>epoch</th>'
        f"{head}<th>duration</th><th>received / sent</th>"
        f"{'<th>converged</th>' if converging else ''}</tr>"
        f"{''.join(rows)}</table>{note}</details>"
    )


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;
max-width:1100px;color:#222;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;border-bottom:1px solid #ddd;
padding-bottom:4px;margin-top:28px}h3{font-size:14px;margin:14px 0 4px}
h3.highlight,h2.highlight{color:#7a3e9d}.muted,.note{color:#777}.scroll{overflow-x:auto}
.grid{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0;border:1px solid #eee;
border-radius:6px;padding:6px 8px}figcaption{font-weight:600;font-size:13px;margin-bottom:4px}
svg text{font-size:11px;fill:#444}svg .label{font-size:12px;fill:#222}
svg .in-cell{font-size:10px;fill:#fff}.axis{stroke:#888}.grid line,.grid{stroke-width:1}
line.grid{stroke:#eee}rect.answered,i.answered{fill:#59a14f;background:#59a14f}
rect.missing,i.missing{fill:#f1ce63;background:#f1ce63}
rect.failed,i.failed{fill:#e15759;background:#e15759}
rect.absent,i.absent{fill:#eee;background:#eee}
.legend{display:flex;gap:12px;margin:4px 0}.key{display:inline-flex;align-items:center;gap:4px;
font-size:12px}.key i{display:inline-block;width:10px;height:10px;border-radius:2px}
table{border-collapse:collapse}table.kv th{text-align:left;vertical-align:top;padding:2px 10px
2px 0;color:#555;font-weight:500;white-space:nowrap}table.kv td{padding:2px 0}
table.epochs td,table.epochs th{border:1px solid #eee;padding:2px 6px;font-size:12px}
.answered-text{color:#2f6b2a}.missing-text{color:#9a7a00}.failed-text{color:#b02a2a}
pre{background:#f7f7f7;padding:8px;overflow:auto;max-height:420px}code{font-size:12px}
.summary span{margin-right:16px}
"""


def render(document: dict[str, Any]) -> str:
    """The whole page for one run document (see `load_run`)."""
    records = _records(document)
    nodes = _nodes(document, records)
    analysis = str(document.get("analysis_id") or "run")
    failure = document.get("failure")
    state = (
        "failed"
        if isinstance(failure, dict)
        else "unfinished"
        if document.get("unfinished")
        else ("converged" if document.get("converged") else "finished")
    )
    result_text = json.dumps(document.get("result"), indent=2, default=str)
    if len(result_text) > MAX_RESULT_CHARS:
        result_text = result_text[:MAX_RESULT_CHARS] + f"\n… ({len(result_text)} characters)"
    answered = sum(len(item.get("nodes") or []) for item in records)
    expected = answered + sum(len(item.get("missing") or []) for item in records)
    total = sum(_finite(item.get("duration_s")) or 0.0 for item in records)
    return "".join(
        [
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
            '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
            "style-src 'unsafe-inline'; img-src data:\">",
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>flame report: {_e(analysis)}</title><style>{_CSS}</style></head><body>",
            f"<h1>flame run <code>{_e(analysis)}</code></h1>",
            f'<p class="summary"><span>{_e(state)}</span>'
            f"<span>{len(records)} epoch(s)</span><span>{len(nodes)} node(s)</span>"
            f"<span>{answered} of {expected} results arrived</span>"
            f"<span>{total:.3f} s in epochs</span></p>",
            _epochs_section(document, records, nodes),
            _convergence_section(records, _manifest_of(document).get("has_converged")),
            _privacy_section(records, nodes),
            _manifest_section(document),
            '<section id="result"><h2>Final result</h2><details open><summary>JSON</summary>'
            f"<pre>{_e(result_text)}</pre></details></section>",
            "</body></html>\n",
        ]
    )
