"""The building blocks of the `flame report` page: escaping, number formats, the run's
records and nodes, and the inline SVG charts (timeline, line and bar charts, legend).

Every value that reaches the page goes through `_e` (HTML-escaped); the charts load nothing.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from typing import Any

PALETTE = [
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2",
    "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac",
]  # fmt: skip
# Series are told apart by colour, dash pattern and marker shape (colour alone fails in
# print and for colour-blind readers); series drawn on top of each other are also offset.
DASHES = ["", "7 3", "2 3", "9 3 2 3", "4 4", "1 5"]
MARKERS = ["circle", "square", "triangle", "diamond"]
OVERLAP_OFFSET = 3.0  # px between series with the same points
LOG_DECADES = 2.0  # positive values spanning more decades than this are drawn on a log scale
MAX_CELLS = 20_000  # timeline cells (nodes x epochs); more and only the last epochs are drawn
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
    """The epochs that finished, and the one a failed run stopped in (who answered it)."""
    records = [item for item in document.get("history", []) if isinstance(item, dict)]
    failed = document.get("failed_epoch")
    if isinstance(failed, dict) and all(r.get("epoch") != failed.get("epoch") for r in records):
        records.append(failed)
    return records


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
    log = _log_scale([p[1] for p in points])
    parts = [
        f'<svg class="chart" data-chart="{chart}"{extra} data-scale="{"log" if log else "linear"}" '
        f'width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}">'
    ]
    if not points:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no data</text>')
        return "".join(parts) + "</svg>"

    def ty(y: float) -> float:
        return math.log10(y) if log else y

    x0, x1 = _scale(min(p[0] for p in points), max(p[0] for p in points))
    y0, y1 = _scale(min(ty(p[1]) for p in points), max(ty(p[1]) for p in points))
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return top + (1 - (ty(y) - y0) / (y1 - y0)) * plot_h

    parts.append(
        f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}"/>'
        f'<line class="axis" x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" '
        f'y2="{top + plot_h}"/>'
    )
    for y in _y_ticks(y0, y1, log):
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
        f'text-anchor="middle">{"epoch · log scale" if log else "epoch"}</text>'
    )
    placed: list[tuple[set[tuple[float, float]], int]] = []  # (points, offset) drawn so far
    for i, (name, values) in enumerate(series.items()):
        color, dash, marker = _style(i)
        drawn = [(round(px(x), 1), round(py(y), 1)) for x, y in values]
        # a series sharing points with earlier ones goes a little lower than each of them
        taken = {k for points, k in placed if points.intersection(drawn)}
        rank = next(k for k in range(len(placed) + 1) if k not in taken)
        placed.append((set(drawn), rank))
        shift = OVERLAP_OFFSET * rank
        coords = " ".join(f"{x:.1f},{y + shift:.1f}" for x, y in drawn)
        dashed = f' stroke-dasharray="{dash}"' if dash else ""
        parts.append(
            f'<polyline class="series" data-series="{_e(name)}" data-offset="{shift:g}" '
            f'fill="none" stroke="{color}" stroke-width="2"{dashed} points="{coords}"/>'
        )
        if len(values) <= 60:
            for (x, y), (cx, cy) in zip(values, drawn, strict=True):
                tip = f"{_e(name)}, epoch {x:g}: {_e(_num(y))}{_e(unit)}"
                parts.append(_marker(marker, cx, cy + shift, color, tip))
    parts.append("</svg>")
    return "".join(parts)


def _log_scale(values: list[float]) -> bool:
    """Positive values spanning more than LOG_DECADES decades (a step size from 6.4 down to
    7e-12 is a flat line at zero on a linear axis)."""
    if not values or min(values) <= 0:
        return False
    return math.log10(max(values) / min(values)) > LOG_DECADES


def _y_ticks(y0: float, y1: float, log: bool) -> list[float]:
    """Tick values (in data units): bottom, middle, top; on a log scale, whole decades."""
    if not log:
        return [y0, (y0 + y1) / 2, y1]
    low, high = math.ceil(y0), math.floor(y1)
    step = max(1, math.ceil((high - low + 1) / 6))
    return [10.0**k for k in range(low, high + 1, step)] or [10.0**y0, 10.0**y1]


def _style(i: int) -> tuple[str, str, str]:
    """(colour, dash pattern, marker) of the i-th series."""
    return PALETTE[i % len(PALETTE)], DASHES[i % len(DASHES)], MARKERS[i % len(MARKERS)]


def _marker(shape: str, x: float, y: float, color: str, tip: str, size: float = 3.5) -> str:
    title = f"<title>{tip}</title>" if tip else ""
    if shape == "square":
        return (
            f'<rect class="marker" x="{x - size:.1f}" y="{y - size:.1f}" width="{2 * size:.1f}" '
            f'height="{2 * size:.1f}" fill="{color}">{title}</rect>'
        )
    if shape in ("triangle", "diamond"):
        if shape == "triangle":
            corners = [(x, y - size * 1.2), (x + size * 1.1, y + size), (x - size * 1.1, y + size)]
        else:
            corners = [(x, y - size * 1.3), (x + size, y), (x, y + size * 1.3), (x - size, y)]
        points = " ".join(f"{a:.1f},{b:.1f}" for a, b in corners)
        return f'<polygon class="marker" points="{points}" fill="{color}">{title}</polygon>'
    return (
        f'<circle class="marker" cx="{x:.1f}" cy="{y:.1f}" r="{size:.1f}" fill="{color}">'
        f"{title}</circle>"
    )


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


def _legend(names: Iterable[str], *, lines: bool = False) -> str:
    """Keys for a chart's series; for line charts, with each series' dash and marker."""
    items = []
    for i, name in enumerate(names):
        color, dash, marker = _style(i)
        if lines:
            dashed = f' stroke-dasharray="{dash}"' if dash else ""
            key = (
                f'<svg width="30" height="12" aria-hidden="true"><line x1="1" y1="6" x2="29" '
                f'y2="6" stroke="{color}" stroke-width="2"{dashed}/>'
                f"{_marker(marker, 15, 6, color, '', 3.0)}</svg>"
            )
        else:
            key = f'<i style="background:{color}"></i>'
        items.append(f'<span class="key">{key}{_e(name)}</span>')
    return f'<div class="legend">{"".join(items)}</div>'

