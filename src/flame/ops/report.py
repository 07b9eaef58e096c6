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

import html
import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from flame.errors import FlameError

__all__ = ["load_run", "render", "write_report"]

PALETTE = [
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2",
    "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac",
]  # fmt: skip
MAX_FIELDS = 24  # convergence charts on one page
MAX_CELLS = 20_000  # timeline cells (nodes x epochs); more and only the last epochs are drawn
MAX_RESULT_CHARS = 50_000
_KNOWN = {"analysis_id", "result", "converged", "epochs", "history", "location", "manifest"}
_HIGHLIGHT = re.compile(r"policy|privacy|dp|spend|budget|epsilon|delta", re.IGNORECASE)


# ------------------------------------------------------------------------------- loading


def load_run(source: str | Path, *, config: Any = None) -> dict[str, Any]:
    """The run document: a `flame simulate --output` JSON file, or an analysis id read
    from storage (FLAME_STORAGE__*, or `config`)."""
    path = Path(source)
    if path.is_file():
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FlameError(f"{path}: not a readable run result ({exc})") from None
        if not isinstance(document, dict) or not isinstance(document.get("history"), list):
            raise FlameError(
                f"{path}: not a run result (expected the JSON of `flame simulate --output`, "
                "with a 'history' list)"
            )
        return document
    if path.suffix.lower() == ".json" or "/" in str(source):
        raise FlameError(f"{source}: no such file")
    return _from_storage(str(source), config)


def _from_storage(analysis_id: str, config: Any) -> dict[str, Any]:
    from flame.aggregator.records import numeric_summary
    from flame.clients.object_store import AnalysisLayout, ObjectNotFound
    from flame.config import load_config
    from flame.wire.envelope import to_jsonable, unpack

    config = config if config is not None else load_config()
    if config.storage.endpoint is None and config.storage.results_dir is None:
        raise FlameError(
            f"{analysis_id!r} is not a file, and no storage is configured to read it from "
            "(FLAME_STORAGE__ENDPOINT or FLAME_STORAGE__RESULTS_DIR)"
        )
    from flame.clients.minio_client import open_store

    store = open_store(config.storage)
    assert store is not None
    layout = AnalysisLayout(analysis_id)
    try:
        manifest = store.get_json(layout.manifest())
        value = unpack(store.get_bytes(layout.final_result()))
    except ObjectNotFound:
        return _unfinished(store, layout, analysis_id, config.aggregator_id)
    history = [dict(item) for item in manifest.get("history", [])]
    for item in history:  # runs before per-epoch summaries: read the stored aggregates
        if "summary" in item:
            continue
        epoch = int(item["epoch"])
        if item is history[-1]:
            item["summary"] = numeric_summary(value)
            continue
        try:
            aggregate = unpack(store.get_bytes(layout.epoch_result(epoch, config.aggregator_id)))
        except ObjectNotFound:
            continue
        item["summary"] = numeric_summary(aggregate)
    extra = {k: v for k, v in manifest.items() if k not in ("history", "result")}
    return {
        "analysis_id": manifest.get("analysis_id", analysis_id),
        "result": to_jsonable(value),
        "converged": manifest.get("converged"),
        "epochs": manifest.get("epochs", len(history)),
        "history": history,
        "location": (manifest.get("result") or {}).get("key"),
        "manifest": extra,
    }


def _unfinished(store: Any, layout: Any, analysis_id: str, aggregator_id: str) -> dict[str, Any]:
    """A run without a final result (running, failed, stopped): its last checkpoint."""
    from flame.clients.object_store import ObjectNotFound
    from flame.wire.envelope import to_jsonable, unpack

    epoch = layout.latest_checkpoint(store)
    if epoch is None:
        raise FlameError(
            f"analysis {analysis_id!r} has neither a final result nor a checkpoint in storage "
            "(wrong analysis id, or a different FLAME_STORAGE__PREFIX?)"
        )
    meta = store.get_json(layout.checkpoint(epoch))
    try:
        value = unpack(store.get_bytes(layout.epoch_result(epoch, aggregator_id)))
    except ObjectNotFound:
        value = None
    return {
        "analysis_id": analysis_id,
        "result": to_jsonable(value),
        "converged": False,
        "epochs": len(meta.get("history", [])),
        "history": list(meta.get("history", [])),
        "location": None,
        "manifest": {"code_sha256": meta.get("code_sha256")},
        "unfinished": f"no final result yet; the last checkpoint is after epoch {epoch}",
    }


def write_report(source: str | Path, out: Path, *, config: Any = None) -> Path:
    """Render `source` (file or analysis id) into the HTML file `out`."""
    out.write_text(render(load_run(source, config=config)), encoding="utf-8")
    return out


# ------------------------------------------------------------------------------- helpers


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e6 or abs(value) < 1e-3:
        return f"{value:.3e}"
    return f"{value:.4g}"


def _bytes(value: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(value) < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"  # pragma: no cover


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _records(document: dict[str, Any]) -> list[dict[str, Any]]:
    return [item for item in document.get("history", []) if isinstance(item, dict)]


def _nodes(document: dict[str, Any], records: Sequence[dict[str, Any]]) -> list[str]:
    manifest = document.get("manifest") if isinstance(document.get("manifest"), dict) else {}
    names: set[str] = {str(n) for n in (manifest or {}).get("participants", []) or []}
    for item in records:
        for key in ("nodes", "missing", "failed"):
            names.update(str(n) for n in item.get(key, []) or [])
    failure = document.get("failure")
    if isinstance(failure, dict) and failure.get("node"):
        names.add(str(failure["node"]))
    return sorted(names)


# ------------------------------------------------------------------------------- charts


def _timeline(document: dict[str, Any], records: list[dict[str, Any]], nodes: list[str]) -> str:
    """One row per node, one cell per epoch: answered (with arrival), missing, failed."""
    failure = document.get("failure") if isinstance(document.get("failure"), dict) else None
    keep = max(1, MAX_CELLS // max(1, len(nodes)))
    records = records[-keep:]  # a huge run shows its last epochs (the table says so)
    epochs = [int(item.get("epoch", i)) for i, item in enumerate(records)]
    if (
        failure is not None
        and isinstance(failure.get("epoch"), int)
        and failure["epoch"] not in epochs
    ):
        epochs.append(int(failure["epoch"]))
        records = [*records, {"epoch": failure["epoch"]}]
    cell = max(14, min(96, 900 // max(1, len(epochs))))
    label, top, row = 120, 22, 26
    width = label + cell * len(epochs) + 10
    height = top + row * len(nodes) + 8
    parts = [
        f'<svg class="chart" data-chart="timeline" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="epoch timeline per node">'
    ]
    step = max(1, len(epochs) // 20)
    for col, epoch in enumerate(epochs):
        if col % step == 0 or col == len(epochs) - 1:
            x = label + col * cell + cell / 2
            parts.append(
                f'<text x="{x:.1f}" y="14" class="tick" text-anchor="middle">{epoch}</text>'
            )
    for r, node in enumerate(nodes):
        y = top + r * row
        parts.append(
            f'<text x="{label - 6}" y="{y + 17}" class="label" text-anchor="end">{_e(node)}</text>'
        )
        for col, item in enumerate(records):
            epoch = epochs[col]
            failed = node in (item.get("failed") or []) or (
                failure is not None
                and failure.get("node") == node
                and failure.get("epoch") == epoch
            )
            arrival = (item.get("arrivals_s") or {}).get(node)
            size = (item.get("result_bytes") or {}).get(node)
            if failed:
                state = "failed"
            elif node in (item.get("nodes") or []):
                state = "answered"
            elif node in (item.get("missing") or []):
                state = "missing"
            else:
                state = "absent"
            tip = f"{node}, epoch {epoch}: {state}"
            if state == "answered" and isinstance(arrival, (int, float)):
                tip += f" after {arrival:.3f} s"
            if state == "answered" and isinstance(size, int):
                tip += f", result {_bytes(size)}"
            if failed and failure is not None and failure.get("reason"):
                tip += f" — {str(failure['reason'])[:300]}"
            x = label + col * cell
            parts.append(
                f'<rect class="cell {state}" data-node="{_e(node)}" data-epoch="{epoch}" '
                f'x="{x + 1}" y="{y + 2}" width="{cell - 2}" height="{row - 4}" rx="3">'
                f"<title>{_e(tip)}</title></rect>"
            )
            if cell >= 56 and state == "answered" and isinstance(arrival, (int, float)):
                parts.append(
                    f'<text x="{x + cell / 2:.1f}" y="{y + 17}" class="in-cell" '
                    f'text-anchor="middle">{arrival:.2f} s</text>'
                )
    parts.append("</svg>")
    return "".join(parts)


def _scale(lo: float, hi: float) -> tuple[float, float]:
    if lo == hi:
        pad = abs(lo) * 0.05 or 1.0
        return lo - pad, hi + pad
    return lo, hi


def _line_chart(
    series: dict[str, list[tuple[float, float]]],
    *,
    chart: str,
    title: str,
    unit: str = "",
    width: int = 420,
    height: int = 180,
    extra: str = "",
) -> str:
    """Lines over epochs; each point carries a tooltip with its exact value."""
    points = [p for values in series.values() for p in values]
    left, right, top, bottom = 64, 12, 12, 26
    parts = [
        f'<svg class="chart" data-chart="{chart}"{extra} width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}">'
    ]
    if not points:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no data</text>')
        return "".join(parts) + "</svg>"
    x0, x1 = _scale(min(p[0] for p in points), max(p[0] for p in points))
    y0, y1 = _scale(min(p[1] for p in points), max(p[1] for p in points))
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * plot_h

    parts.append(
        f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}"/>'
        f'<line class="axis" x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" '
        f'y2="{top + plot_h}"/>'
    )
    for y in (y0, (y0 + y1) / 2, y1):
        parts.append(
            f'<text class="tick" x="{left - 4}" y="{py(y) + 4:.1f}" text-anchor="end">'
            f"{_e(_num(y))}</text>"
            f'<line class="grid" x1="{left}" y1="{py(y):.1f}" x2="{left + plot_w}" '
            f'y2="{py(y):.1f}"/>'
        )
    for tick in sorted({math.ceil(x0), math.floor(x1)}):
        if x0 <= tick <= x1:
            parts.append(
                f'<text class="tick" x="{px(tick):.1f}" y="{height - 8}" text-anchor="middle">'
                f"{tick}</text>"
            )
    parts.append(
        f'<text class="tick" x="{left + plot_w / 2:.1f}" y="{height - 8}" '
        'text-anchor="middle">epoch</text>'
    )
    for i, (name, values) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in values)
        parts.append(
            f'<polyline class="series" data-series="{_e(name)}" fill="none" stroke="{color}" '
            f'stroke-width="2" points="{coords}"/>'
        )
        if len(values) <= 60:
            for x, y in values:
                parts.append(
                    f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}">'
                    f"<title>{_e(name)}, epoch {x:g}: {_e(_num(y))}{_e(unit)}</title></circle>"
                )
    parts.append("</svg>")
    return "".join(parts)


def _bar_chart(
    groups: dict[str, list[tuple[int, float]]], *, chart: str, title: str, fmt: Any = _num
) -> str:
    """Bars per epoch, one colour per group (side by side)."""
    epochs = sorted({e for values in groups.values() for e, _ in values})
    top_value = max([v for values in groups.values() for _, v in values] + [0.0]) or 1.0
    left, right, top, bottom, height = 64, 12, 12, 26, 180
    slot = max(6, min(60, 640 // max(1, len(epochs))))
    width = left + right + slot * len(epochs)
    plot_h = height - top - bottom
    bar = max(2, (slot - 4) // max(1, len(groups)))
    parts = [
        f'<svg class="chart" data-chart="{chart}" width="{max(width, 200)}" height="{height}" '
        f'viewBox="0 0 {max(width, 200)} {height}" role="img" aria-label="{_e(title)}">',
        f'<line class="axis" x1="{left}" y1="{top + plot_h}" x2="{width - right}" '
        f'y2="{top + plot_h}"/>',
        f'<text class="tick" x="{left - 4}" y="{top + 8}" text-anchor="end">'
        f"{_e(fmt(top_value))}</text>",
        f'<text class="tick" x="{left - 4}" y="{top + plot_h}" text-anchor="end">0</text>',
    ]
    position = {e: i for i, e in enumerate(epochs)}
    for g, (name, values) in enumerate(groups.items()):
        for epoch, value in values:
            h = max(1.0, value / top_value * plot_h) if value > 0 else 0.0
            x = left + position[epoch] * slot + 2 + g * bar
            parts.append(
                f'<rect class="bar" data-series="{_e(name)}" x="{x}" y="{top + plot_h - h:.1f}" '
                f'width="{bar - 1}" height="{h:.1f}" fill="{PALETTE[g % len(PALETTE)]}">'
                f"<title>{_e(name)}, epoch {epoch}: {_e(fmt(value))}</title></rect>"
            )
    step = max(1, len(epochs) // 12)
    for i, epoch in enumerate(epochs):
        if i % step == 0 or i == len(epochs) - 1:
            parts.append(
                f'<text class="tick" x="{left + i * slot + slot / 2:.1f}" y="{height - 8}" '
                f'text-anchor="middle">{epoch}</text>'
            )
    parts.append("</svg>")
    return "".join(parts)


def _legend(names: Iterable[str]) -> str:
    items = "".join(
        f'<span class="key"><i style="background:{PALETTE[i % len(PALETTE)]}"></i>{_e(n)}</span>'
        for i, n in enumerate(names)
    )
    return f'<div class="legend">{items}</div>'


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


def _manifest_section(document: dict[str, Any]) -> str:
    manifest = document.get("manifest") if isinstance(document.get("manifest"), dict) else {}
    manifest = dict(manifest or {})
    config = manifest.pop("config", None)
    facts: dict[str, Any] = {
        "analysis id": document.get("analysis_id"),
        "code SHA-256": manifest.pop("code_sha256", None),
        "participants": manifest.pop("participants", None),
        "flame version": manifest.pop("flame_version", None),
        "created": manifest.pop("created", None),
        "epochs": document.get("epochs"),
        "converged": document.get("converged"),
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


def _convergence_section(records: list[dict[str, Any]]) -> str:
    fields: dict[str, list[tuple[float, float]]] = {}
    for i, item in enumerate(records):
        summary = item.get("summary")
        if not isinstance(summary, dict):
            continue
        for name, value in summary.items():
            number = _finite(value)
            if number is not None and (name in fields or len(fields) < MAX_FIELDS):
                fields.setdefault(str(name), []).append((float(item.get("epoch", i)), number))
    out = ['<section id="convergence"><h2>Convergence of the aggregate</h2>']
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
                    chart="convergence",
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
            + _legend(arrivals)
            + _line_chart(arrivals, chart="arrivals", title="arrival per node", unit=" s")
            + "</figure>"
        )
    out.append("</div>")
    out.append(_epoch_table(records, nodes))
    out.append("</section>")
    return "".join(out)


def _privacy_section(records: list[dict[str, Any]], nodes: list[str]) -> str:
    """Per-epoch privacy reports of the nodes (DP spend, suppressed cells), when recorded."""
    if not any(isinstance(item.get("privacy"), dict) and item["privacy"] for item in records):
        return ""
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
            + _legend(totals)
            + _line_chart(totals, chart="privacy", title="epsilon spent per node")
            + "</figure></div>"
        )
    return (
        '<section id="privacy"><h2 class="highlight">Privacy per epoch</h2>'
        f'{chart}<details><summary>per node and epoch</summary><table class="epochs">'
        f"<tr><th>epoch</th>{head}</tr>{''.join(rows)}</table></details></section>"
    )


def _epoch_table(records: list[dict[str, Any]], nodes: list[str]) -> str:
    head = "".join(f"<th>{_e(n)}</th>" for n in nodes)
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
            f"<td>{'yes' if item.get('converged') else ''}</td></tr>"
        )
    note = f'<p class="note">last 200 of {len(records)} epochs</p>' if len(records) > 200 else ""
    return (
        '<details><summary>table</summary><table class="epochs"><tr><th>epoch</th>'
        f"{head}<th>duration</th><th>received / sent</th><th>converged</th></tr>"
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
            _convergence_section(records),
            _privacy_section(records, nodes),
            _manifest_section(document),
            '<section id="result"><h2>Final result</h2><details open><summary>JSON</summary>'
            f"<pre>{_e(result_text)}</pre></details></section>",
            "</body></html>\n",
        ]
    )
