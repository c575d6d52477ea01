"""Hand-written SVG plots for the leaderboard site (and the speed bench's page).

The plots are returned as :class:`markupsafe.Markup` so that the page templates can embed
them without escaping them a second time. That is only sound because this module escapes
every text it places in the SVG itself (titles, labels, series names, tick labels) with
:func:`esc`; colours and numbers come from the site's own palette and formatting, never
from a record.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Sequence

import numpy as np
from markupsafe import Markup, escape

__all__ = ["Series", "esc", "svg_intervals", "svg_lines"]


def esc(x: Any) -> Markup:
    """Text escaped for element content and quoted attributes alike; the same escaping the
    page templates apply, so a page spells every entity one way. None is empty text."""
    return escape("" if x is None else str(x))


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    span = hi - lo
    raw = span / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    out, t = [], first
    while t <= hi + 1e-9 * span:
        out.append(0.0 if abs(t) < 1e-12 * max(1.0, span) else t)
        t += step
    return out


def _tick_label(v: float) -> str:
    if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
        return f"{v:.2g}".replace("e+0", "e").replace("e+", "e")
    return f"{v:.4g}"


def _range(values: Iterable[float], include: Sequence[float] = ()) -> tuple[float, float]:
    vals = [v for v in values if math.isfinite(v)] + list(include)
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.03 * (hi - lo)
    return lo - pad, hi + pad


def _svg_open(w: int, h: int, title: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" '
            f'height="{h}" role="img" aria-label="{esc(title)}"><title>{esc(title)}</title>'
            f'<text x="{w / 2:.1f}" y="16" text-anchor="middle" font-size="13" '
            f'font-weight="600">{esc(title)}</text>')


def _short(label: str, n: int = 26) -> str:
    # Truncate before escaping so an entity is never cut in half.
    return label if len(label) <= n else label[: n - 1] + "\u2026"


def svg_intervals(title: str, rows: Sequence[tuple[str, str, tuple[float, float, float]]],
                  xlabel: str) -> Markup:
    """A horizontal point-and-CI plot, one row per (label, colour, (point, lo, hi))."""
    if not rows:
        return Markup("")
    left, right, top, row_h = 190, 16, 28, 18
    w, h = 560, top + row_h * len(rows) + 40
    x0, x1 = _range([v for _, _, iv in rows for v in iv])
    sx = lambda v: left + (v - x0) / (x1 - x0) * (w - left - right)  # noqa: E731
    out = [_svg_open(w, h, title)]
    bottom = top + row_h * len(rows)
    for t in _ticks(x0, x1):
        out.append(f'<line x1="{sx(t):.1f}" y1="{top}" x2="{sx(t):.1f}" y2="{bottom}" '
                   f'stroke="#e5e5e5"/><text x="{sx(t):.1f}" y="{bottom + 14}" font-size="10" '
                   f'text-anchor="middle">{esc(_tick_label(t))}</text>')
    for i, (label, colour, (p, lo, hi)) in enumerate(rows):
        y = top + row_h * i + row_h / 2
        out.append(f'<g><title>{esc(label)}: {p:.3f} [{lo:.3f}, {hi:.3f}]</title>'
                   f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">'
                   f'{esc(_short(label))}</text>'
                   f'<rect x="{sx(lo):.1f}" y="{y - 5:.1f}" width="{max(sx(hi) - sx(lo), 1):.1f}" '
                   f'height="10" fill="{esc(colour)}" fill-opacity="0.35"/>'
                   f'<line x1="{sx(p):.1f}" y1="{y - 7:.1f}" x2="{sx(p):.1f}" y2="{y + 7:.1f}" '
                   f'stroke="{esc(colour)}" stroke-width="2.5"/></g>')
    out.append(f'<text x="{(left + w - right) / 2:.1f}" y="{h - 6}" font-size="11" '
               f'text-anchor="middle">{esc(xlabel)}</text></svg>')
    return Markup("".join(out))


def _spans(mask: np.ndarray) -> list[tuple[int, int]]:
    """``[start, end)`` of each run of True in ``mask`` (a null point breaks a line)."""
    d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist()))


def _points(px: np.ndarray, py: np.ndarray) -> str:
    """SVG ``points`` text; one format call for the whole line keeps big sites fast."""
    flat = np.column_stack([px, py]).ravel().tolist()
    return ("%.1f,%.1f " * len(px) % tuple(flat)).rstrip()


@dataclasses.dataclass
class Series:
    label: str
    colour: str
    xs: np.ndarray
    ys: np.ndarray
    width: float = 1.8
    opacity: float = 1.0
    band: tuple[np.ndarray, np.ndarray] | None = None
    markers: bool = False
    """Draw a dot at every point, not only the line (for series with few points)."""


def svg_lines(title: str, series: Sequence[Series], xlabel: str, ylabel: str,
              include_y: Sequence[float] = (), w: int = 620, h: int = 300) -> Markup:
    """A line chart; each series may carry a (lo, hi) band. Dashed lines mark y = 0 and 1."""
    xs = np.concatenate([np.zeros(0)] + [np.asarray(s.xs, float) for s in series])
    ys = np.concatenate([np.zeros(0)] + [np.asarray(s.ys, float) for s in series]
                        + [np.asarray(b, float) for s in series if s.band for b in s.band])
    xs, ys = xs[np.isfinite(xs)], ys[np.isfinite(ys)]
    if not xs.size or not ys.size:
        return Markup(f'<p class="muted">{esc(title)}: no data</p>')
    left, right, top, bottom = 56, 14, 28, 42
    x0, x1 = _range([xs.min(), xs.max()])
    y0, y1 = _range([ys.min(), ys.max()], include=include_y)
    sx = lambda v: left + (v - x0) / (x1 - x0) * (w - left - right)  # noqa: E731
    sy = lambda v: h - bottom - (v - y0) / (y1 - y0) * (h - top - bottom)  # noqa: E731
    out = [_svg_open(w, h, title)]
    for t in _ticks(x0, x1):
        out.append(f'<line x1="{sx(t):.1f}" y1="{top}" x2="{sx(t):.1f}" y2="{h - bottom}" '
                   f'stroke="#eee"/><text x="{sx(t):.1f}" y="{h - bottom + 14}" font-size="10" '
                   f'text-anchor="middle">{esc(_tick_label(t))}</text>')
    for t in _ticks(y0, y1):
        out.append(f'<line x1="{left}" y1="{sy(t):.1f}" x2="{w - right}" y2="{sy(t):.1f}" '
                   f'stroke="#eee"/><text x="{left - 4}" y="{sy(t) + 3:.1f}" font-size="10" '
                   f'text-anchor="end">{esc(_tick_label(t))}</text>')
    for ref in (0.0, 1.0):
        if y0 <= ref <= y1 and include_y:
            out.append(f'<line x1="{left}" y1="{sy(ref):.1f}" x2="{w - right}" '
                       f'y2="{sy(ref):.1f}" stroke="#999" stroke-dasharray="4 3"/>')
    out += [_band(s, sx, sy) for s in series if s.band is not None]
    for s in series:
        out += _line(s, sx, sy)
    out.append(f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" '
               f'stroke="#333"/><line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" '
               f'stroke="#333"/>'
               f'<text x="{(left + w - right) / 2:.1f}" y="{h - 8}" font-size="11" '
               f'text-anchor="middle">{esc(xlabel)}</text>'
               f'<text x="12" y="{(top + h - bottom) / 2:.1f}" font-size="11" '
               f'text-anchor="middle" transform="rotate(-90 12 {(top + h - bottom) / 2:.1f})">'
               f'{esc(ylabel)}</text></svg>')
    return Markup("".join(out))


def _band(s: Series, sx, sy) -> str:
    """The shaded (lo, hi) band of a series, skipping points where either bound is null."""
    lo, hi = np.asarray(s.band[0], float), np.asarray(s.band[1], float)
    ok = np.isfinite(lo) & np.isfinite(hi) & np.isfinite(s.xs)
    px = sx(np.asarray(s.xs, float)[ok])
    pts = _points(np.concatenate([px, px[::-1]]), sy(np.concatenate([lo[ok], hi[ok][::-1]])))
    return f'<polygon points="{pts}" fill="{esc(s.colour)}" fill-opacity="0.12" stroke="none"/>'


def _line(s: Series, sx, sy) -> list[str]:
    """A series as one polyline per run of finite points, with dots where asked for."""
    out = []
    xs, ys = np.asarray(s.xs, float), np.asarray(s.ys, float)
    px, py = sx(xs), sy(ys)
    colour, label = esc(s.colour), esc(s.label)
    for a, b in _spans(np.isfinite(xs) & np.isfinite(ys)):
        out.append(f'<polyline points="{_points(px[a:b], py[a:b])}" fill="none" '
                   f'stroke="{colour}" stroke-width="{s.width}" '
                   f'stroke-opacity="{s.opacity}"><title>{label}</title></polyline>')
        # A one-point polyline draws nothing, so a lone point always gets its dot.
        dots = range(a, b) if s.markers or b - a == 1 else ()
        out.extend(f'<circle cx="{px[k]:.1f}" cy="{py[k]:.1f}" r="{1.5 * s.width:.1f}" '
                   f'fill="{colour}" fill-opacity="{s.opacity}">'
                   f'<title>{label}</title></circle>' for k in dots)
    return out
