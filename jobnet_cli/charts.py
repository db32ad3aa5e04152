"""Charts of bytes over time for `jobnet usage --chart` (the terminal: unicode block bars and sparklines) and
`--chart-file PATH.svg` (a hand-written SVG line chart). Pure functions of a series; no dependencies.

A series is a list of points (t, tx_bytes, rx_bytes): t is the end of the step (Unix seconds), the bytes are
the traffic within the step.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from xml.sax.saxutils import escape

Point = tuple[float, int, int]  # (end of step, tx bytes, rx bytes)

BLOCKS = " ▁▂▃▄▅▆▇█"  # eighths of a cell
SPARKS = "▁▂▃▄▅▆▇█"


def _time_label(t: float, span: float) -> str:
    when = dt.datetime.fromtimestamp(t).astimezone()
    if span < 86400:
        return when.strftime("%H:%M")
    return when.strftime("%m-%d %H:%M")


def sparkline(values: Sequence[int], top: int | None = None) -> str:
    """One character per value, ▁ (smallest non-zero) .. █ (top); a blank for zero."""
    top = max(values, default=0) if top is None else top
    if top <= 0:
        return " " * len(values)
    out = []
    for v in values:
        if v <= 0:
            out.append(" ")
        else:
            out.append(SPARKS[min(len(SPARKS) - 1, max(0, round(v / top * len(SPARKS)) - 1))])
    return "".join(out)


def bars(values: Sequence[int], height: int) -> list[str]:
    """A vertical bar per value, `height` rows of eighth blocks, top row first."""
    top = max(values, default=0)
    eighths = [0 if top <= 0 else round(v / top * height * 8) for v in values]
    for i, v in enumerate(values):
        if v > 0 and eighths[i] == 0:
            eighths[i] = 1  # any traffic shows
    rows = []
    for r in range(height - 1, -1, -1):
        rows.append("".join(BLOCKS[max(0, min(8, e - r * 8))] for e in eighths))
    return rows


def terminal_chart(points: Sequence[Point], title: str, fmt: Callable[[int], str], height: int = 8) -> str:
    """Bars of tx + rx per step, an axis with times, and a sparkline per direction on the same scale."""
    if not points:
        return f"{title}\n(no points)"
    totals = [tx + rx for _, tx, rx in points]
    top = max(totals)
    label_w = max(len(fmt(top)), len("0"), 2)
    lines = [title]
    for i, row in enumerate(bars(totals, height)):
        label = fmt(top) if i == 0 else ""
        lines.append(f"{label:>{label_w}} ┤{row}" if i == 0 else f"{label:>{label_w}} │{row}")
    width = len(points)
    lines.append(f"{'0':>{label_w}} └" + "─" * width)
    step = points[1][0] - points[0][0] if len(points) > 1 else 0.0
    t0 = points[0][0] - step  # start of the first step
    span = points[-1][0] - t0
    left, right = _time_label(t0, span), _time_label(points[-1][0], span)
    axis = left + right.rjust(max(1, width - len(left)))
    if width >= len(left) + len(right) + 12:
        mid = _time_label(t0 + span / 2, span)
        pos = width // 2 - len(mid) // 2
        axis = left.ljust(pos) + mid
        axis += right.rjust(width - len(axis))
    lines.append(" " * (label_w + 2) + axis)
    tx = [p[1] for p in points]
    rx = [p[2] for p in points]
    lines.append(f"{'tx':>{label_w}}  {sparkline(tx, top)}  {fmt(sum(tx))}")
    lines.append(f"{'rx':>{label_w}}  {sparkline(rx, top)}  {fmt(sum(rx))}")
    return "\n".join(lines)


def svg_chart(points: Sequence[Point], title: str, fmt: Callable[[int], str], width: int = 800,
              height: int = 320) -> str:
    """A line chart of tx, rx and their sum per step, with axes, ticks and a legend."""
    ml, mr, mt, mb = 80, 20, 40, 50
    pw, ph = width - ml - mr, height - mt - mb
    step = points[1][0] - points[0][0] if len(points) > 1 else 1.0
    t0 = points[0][0] - step if points else 0.0
    t1 = points[-1][0] if points else 1.0
    span = max(t1 - t0, 1e-9)
    top = max((tx + rx for _, tx, rx in points), default=0) or 1

    def x(t: float) -> float:
        return ml + (t - t0) / span * pw

    def y(v: float) -> float:
        return mt + ph - v / top * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2:.1f}" y="22" text-anchor="middle" font-size="14">{escape(title)}</text>']
    for i in range(5):  # horizontal grid and y labels
        v = top * i / 4
        yy = y(v)
        out.append(f'<line x1="{ml}" y1="{yy:.1f}" x2="{ml + pw}" y2="{yy:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{ml - 6}" y="{yy + 4:.1f}" text-anchor="end">{escape(fmt(round(v)))}</text>')
    for i in range(5):  # x ticks
        t = t0 + span * i / 4
        xx = x(t)
        out.append(f'<line x1="{xx:.1f}" y1="{mt + ph}" x2="{xx:.1f}" y2="{mt + ph + 5}" stroke="#333"/>')
        out.append(f'<text x="{xx:.1f}" y="{mt + ph + 20}" text-anchor="middle">'
                   f'{escape(_time_label(t, span))}</text>')
    out.append(f'<line x1="{ml}" y1="{mt + ph}" x2="{ml + pw}" y2="{mt + ph}" stroke="#333"/>')
    out.append(f'<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{mt + ph}" stroke="#333"/>')
    series = (("total", "#333", [tx + rx for _, tx, rx in points]), ("tx", "#1f77b4", [p[1] for p in points]),
              ("rx", "#d62728", [p[2] for p in points]))
    for name, color, values in series:
        # Each step's bytes drawn flat across the step (a step line): the area under it is the traffic.
        coords = []
        prev_t = t0
        for (t, _, _), v in zip(points, values, strict=True):
            coords.append(f"{x(prev_t):.1f},{y(v):.1f}")
            coords.append(f"{x(t):.1f},{y(v):.1f}")
            prev_t = t
        out.append(f'<polyline class="{name}" fill="none" stroke="{color}" stroke-width="1.5" '
                   f'points="{" ".join(coords)}"/>')
    for i, (name, color, values) in enumerate(series):
        lx = ml + 10 + i * 170
        out.append(f'<line x1="{lx}" y1="{height - 12}" x2="{lx + 20}" y2="{height - 12}" stroke="{color}" '
                   'stroke-width="2"/>')
        out.append(f'<text x="{lx + 25}" y="{height - 8}">{escape(f"{name} {fmt(sum(values))}")}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
