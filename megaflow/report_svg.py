"""Tiny inline-SVG charts for the batch report: step lines, box plots, bars, a per-row heat strip.

Each function returns one ``<svg>`` element as a string (with a ``<title>`` for accessibility);
no plotting library needed. Axis scales are linear, or log10 when durations span decades.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from html import escape

COLORS = ("#3366cc", "#dc7a1c", "#2a9d5c", "#c0392b", "#8e44ad", "#16a5a5")
FONT = 'font-family="system-ui, sans-serif" font-size="12"'


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation; None for no values."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def fmt_num(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".") if abs(v) < 1e6 else f"{v:.3g}"


class Scale:
    """Maps data values in [lo, hi] to pixels in [a, b]; log10 when ``log``."""

    def __init__(self, lo: float, hi: float, a: float, b: float, *, log: bool = False):
        self.log = log
        if log:
            lo, hi = math.log10(lo), math.log10(hi)
        if hi <= lo:
            hi = lo + 1
        self.lo, self.hi, self.a, self.b = lo, hi, a, b

    def __call__(self, v: float) -> float:
        if self.log:
            v = math.log10(max(v, 10**self.lo))
        return self.a + (v - self.lo) / (self.hi - self.lo) * (self.b - self.a)

    def ticks(self, n: int = 6) -> list[float]:
        if self.log:
            steps = (1,) if self.hi - self.lo > 2.5 else (1, 2, 5)
            return [
                m * 10.0**e
                for e in range(math.floor(self.lo), math.ceil(self.hi) + 1)
                for m in steps
                if self.lo - 1e-9 <= math.log10(m * 10.0**e) <= self.hi + 1e-9
            ]
        raw = (self.hi - self.lo) / max(n, 1)
        mag = 10 ** math.floor(math.log10(raw))
        step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
        first = math.ceil(self.lo / step) * step
        return [first + i * step for i in range(int((self.hi - first) / step + 1e-9) + 1)]


def _frame(width: int, height: int, title: str, body: list[str]) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" role="img" aria-label="{escape(title)}" {FONT}>'
        f"<title>{escape(title)}</title>" + "".join(body) + "</svg>"
    )


def no_data(title: str, width: int = 900) -> str:
    """A small placeholder chart saying there is nothing to draw."""
    return _frame(width, 60, title, [f'<text x="10" y="35" fill="#888">{escape(title)}: no data</text>'])


def _x_axis(scale: Scale, y: float, top: float, label: str, fmt: Callable[[float], str], x_mid: float) -> list[str]:
    out = [f'<line x1="{scale.a:.1f}" y1="{y:.1f}" x2="{scale.b:.1f}" y2="{y:.1f}" stroke="#999"/>']
    for t in scale.ticks():
        x = scale(t)
        out.append(f'<line x1="{x:.1f}" y1="{top:.1f}" x2="{x:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{x:.1f}" y="{y + 15:.1f}" text-anchor="middle" fill="#555">{escape(fmt(t))}</text>')
    out.append(f'<text x="{x_mid:.1f}" y="{y + 32:.1f}" text-anchor="middle" fill="#333">{escape(label)}</text>')
    return out


def _downsample(points: list[tuple[float, float]], bins: int = 1500) -> list[tuple[float, float]]:
    """At most ~2*bins points of a step function, keeping each bin's peak."""
    if len(points) <= 2 * bins:
        return points
    t0, t1 = points[0][0], points[-1][0]
    width = (t1 - t0) / bins or 1.0
    out: dict[int, float] = {}
    for t, v in points:
        i = min(int((t - t0) / width), bins - 1)
        out[i] = max(out.get(i, v), v)
    reduced = [(t0 + i * width, v) for i, v in sorted(out.items())]
    return reduced + [points[-1]]


def step_chart(
    series: Sequence[tuple[str, list[tuple[float, float]]]],
    *,
    title: str,
    x_label: str,
    y_label: str,
    width: int = 900,
    height: int = 300,
) -> str:
    """Step lines (e.g. episodes running over time), one per named series of (x, y) change points."""
    series = [(name, _downsample(pts)) for name, pts in series if pts]
    if not series:
        return no_data(title, width)
    left, right, top, bottom = 55, 20, 30, 50
    xmax = max(p[0] for _, pts in series for p in pts) or 1.0
    ymax = max(p[1] for _, pts in series for p in pts) or 1.0
    xs = Scale(0, xmax, left, width - right)
    ys = Scale(0, ymax * 1.05, height - bottom, top)
    body = _x_axis(xs, height - bottom, top, x_label, fmt_num, (left + width - right) / 2)
    for t in ys.ticks(5):
        y = ys(t)
        body.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" stroke="#eee"/>')
        body.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#555">{fmt_num(t)}</text>')
    body.append(
        f'<text x="14" y="{(top + height - bottom) / 2:.1f}" text-anchor="middle" fill="#333" '
        f'transform="rotate(-90 14 {(top + height - bottom) / 2:.1f})">{escape(y_label)}</text>'
    )
    for i, (name, pts) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        d = [f"M{xs(pts[0][0]):.1f},{ys(0):.1f}", f"V{ys(pts[0][1]):.1f}"]
        for t, v in pts[1:]:
            d.append(f"H{xs(t):.1f}V{ys(v):.1f}")
        body.append(
            f'<path d="{"".join(d)}" fill="none" stroke="{color}" stroke-width="1.6">'
            f"<title>{escape(name)}</title></path>"
        )
        lx = left + 10 + i * 260
        body.append(
            f'<rect x="{lx}" y="8" width="14" height="4" fill="{color}"/>'
            f'<text x="{lx + 20}" y="15" fill="#333">{escape(name)}</text>'
        )
    return _frame(width, height, title, body)


def box_chart(
    groups: Sequence[tuple[str, list[float]]],
    *,
    title: str,
    x_label: str,
    fmt: Callable[[float], str] = fmt_num,
    width: int = 900,
) -> str:
    """One horizontal box per group: box p25–p75, whiskers p5–p95, a bar at the median."""
    groups = [(name, sorted(v)) for name, v in groups]
    values = [x for _, v in groups for x in v]
    if not values:
        return no_data(title, width)
    row, left, right, top, bottom = 30, 120, 230, 10, 50
    height = top + row * len(groups) + bottom
    positive = [x for x in values if x > 0]
    lo, hi = (min(positive) if positive else 0.0), max(values)
    log = bool(positive) and hi / lo > 50
    if log:
        xs = Scale(lo / 1.25, hi * 1.25, left, width - right, log=True)
    else:
        xs = Scale(0.0, hi * 1.05 if hi > 0 else 1.0, left, width - right)
    body = _x_axis(xs, height - bottom, top, x_label + (" (log scale)" if log else ""), fmt, (left + width - right) / 2)
    for i, (name, v) in enumerate(groups):
        cy = top + row * i + row / 2
        color = COLORS[i % len(COLORS)]
        body.append(f'<text x="{left - 8}" y="{cy + 4:.1f}" text-anchor="end" fill="#333">{escape(name)}</text>')
        if not v:
            body.append(f'<text x="{left + 4}" y="{cy + 4:.1f}" fill="#999">no data</text>')
            continue
        p5, p25, p50, p75, p95 = (percentile(v, q) or 0.0 for q in (5, 25, 50, 75, 95))  # v is non-empty
        body.append(f'<line x1="{xs(p5):.1f}" y1="{cy:.1f}" x2="{xs(p95):.1f}" y2="{cy:.1f}" stroke="{color}"/>')
        body.append(
            f'<rect x="{xs(p25):.1f}" y="{cy - 8:.1f}" width="{max(xs(p75) - xs(p25), 1):.1f}" '
            f'height="16" fill="{color}" fill-opacity="0.35" stroke="{color}"/>'
        )
        body.append(
            f'<line x1="{xs(p50):.1f}" y1="{cy - 9:.1f}" x2="{xs(p50):.1f}" y2="{cy + 9:.1f}" '
            f'stroke="{color}" stroke-width="2.5"/>'
        )
        body.append(
            f'<text x="{width - right + 8}" y="{cy + 4:.1f}" fill="#333">p50 {escape(fmt(p50))} · '
            f"p95 {escape(fmt(p95))} · n={len(v)}</text>"
        )
    return _frame(width, height, title, body)


def bar_chart(
    items: Sequence[tuple[str, float, str]],
    *,
    title: str,
    x_label: str,
    width: int = 900,
    fmt: Callable[[float], str] = fmt_num,
    xmax: float | None = None,
) -> str:
    """Horizontal bars: (label, value, annotation) per row, in the order given."""
    if not items:
        return no_data(title, width)
    row, left, right, top, bottom = 26, 160, 260, 10, 50
    height = top + row * len(items) + bottom
    xs = Scale(0.0, max([v for _, v, _ in items] + [xmax or 0.0]) or 1.0, left, width - right)
    body = _x_axis(xs, height - bottom, top, x_label, fmt, (left + width - right) / 2)
    for i, (name, v, note) in enumerate(items):
        y = top + row * i + 4
        color = COLORS[i % len(COLORS)]
        body.append(f'<text x="{left - 8}" y="{y + 13}" text-anchor="end" fill="#333">{escape(name)}</text>')
        body.append(
            f'<rect x="{left}" y="{y}" width="{max(xs(v) - left, 1):.1f}" height="{row - 8}" '
            f'fill="{color}"><title>{escape(name)}: {escape(note)}</title></rect>'
        )
        body.append(f'<text x="{xs(v) + 6:.1f}" y="{y + 13}" fill="#333">{escape(note)}</text>')
    return _frame(width, height, title, body)


def _shade(share: float) -> str:
    """White (idle) to dark blue (every slot used); a share above 1 stays dark."""
    share = min(max(share, 0.0), 1.0)
    r, g, b = (round(255 + (c - 255) * share) for c in (0x1F, 0x3A, 0x93))
    return f"#{r:02x}{g:02x}{b:02x}"


def heat_strips(
    rows: Sequence[tuple[str, list[tuple[float, float, str]]]],
    *,
    title: str,
    x_label: str,
    width: int = 900,
    bins: int = 400,
) -> str:
    """One horizontal strip per named row over a shared time axis, shaded by a share in [0, 1].

    Each row is (name, [(x, share, note)]) of change points; a point holds until the row's next one
    (the last for one bin width). Used for per-host utilisation: used slots / slots over time.
    """
    rows = [(name, sorted(pts)) for name, pts in rows if pts]
    if not rows:
        return no_data(title, width)
    row, left, right, top, bottom = 20, 160, 20, 30, 50
    height = top + row * len(rows) + bottom
    x0 = min(pts[0][0] for _, pts in rows)
    x1 = max(pts[-1][0] for _, pts in rows)
    step = (x1 - x0) / bins if x1 > x0 else 1.0
    xs = Scale(x0, x1 + step, left, width - right)
    body = _x_axis(xs, height - bottom, top, x_label, fmt_num, (left + width - right) / 2)
    for i, (name, pts) in enumerate(rows):
        y = top + row * i + 2
        body.append(f'<text x="{left - 8}" y="{y + 12}" text-anchor="end" fill="#333">{escape(name)}</text>')
        peak: dict[int, tuple[float, float, str]] = {}  # bin -> (x, share, note) of its busiest point
        for x, share, note in pts:
            b = min(int((x - x0) / step), bins)
            if b not in peak or share > peak[b][1]:
                peak[b] = (x, share, note)
        kept = [peak[b] for b in sorted(peak)]
        for j, (x, share, note) in enumerate(kept):
            end = kept[j + 1][0] if j + 1 < len(kept) else x + step
            body.append(
                f'<rect x="{xs(x):.1f}" y="{y}" width="{max(xs(end) - xs(x), 0.5):.1f}" height="{row - 4}" '
                f'fill="{_shade(share)}" stroke="none"><title>{escape(name)}: {escape(note)}</title></rect>'
            )
        body.append(
            f'<rect x="{left}" y="{y}" width="{width - right - left}" height="{row - 4}" fill="none" stroke="#ddd"/>'
        )
    lx = width - right - 220
    for k in range(5):
        body.append(f'<rect x="{lx + 60 + k * 30}" y="8" width="30" height="10" fill="{_shade(k / 4)}" stroke="#ccc"/>')
    body.append(f'<text x="{lx + 54}" y="17" text-anchor="end" fill="#333">used share 0</text>')
    body.append(f'<text x="{lx + 216}" y="17" fill="#333">1</text>')
    return _frame(width, height, title, body)
