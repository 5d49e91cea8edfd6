"""SVG charts rendered on the server, for the console's pages.

The console's Content-Security-Policy allows no script and no inline style, so the
charts are plain SVG with presentation attributes (fill, stroke, font-size), which
CSS may override through the classes: `chart` (the svg), `chart-title`, `chart-axis`,
`chart-grid`, `chart-bar` (plus `chart-bar-muted`), `chart-legend`, `chart-empty`,
`chart-line`. Every label and value is escaped; the output is well-formed XML.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from html import escape
from typing import NamedTuple

__all__ = ["PALETTE", "bars", "sparkline", "stacked_bars"]

# Okabe-Ito, keeping only the colours with at least 3:1 contrast against white
# (WCAG 1.4.11): orange, sky blue and yellow are too pale. Series beyond these are
# folded into one "others" layer; the data table beside the chart has them all.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#000000")
_HATCH = "hatch"  # resolved to this chart's own <pattern> id when drawn
_TEXT, _GRID, _AXIS = "#333333", "#DDDDDD", "#767676"
_CHAR_W = 7.0  # a 12px sans-serif character, on average: enough to lay out labels
_LEFT, _RIGHT, _BOTTOM = 56.0, 12.0, 24.0
_LABEL_CHARS, _LEGEND_CHARS = 12, 24


class _Layer(NamedTuple):
    name: str
    values: tuple[float, ...]
    fill: str


def stacked_bars(
    days: Sequence[str],
    series: Mapping[str, Sequence[float]],
    *,
    title: str,
    unit: str,
    width: int = 960,
    height: int = 320,
    muted: Collection[str] = (),
) -> str:
    """One stacked bar per day, one layer per series; `muted` layers (idle) hatched, on top."""
    labels = [str(day) for day in days]
    checked = {
        str(name): _checked(values, len(labels), str(name)) for name, values in series.items()
    }
    loud = [name for name in checked if name not in muted]
    folded: list[str] = []
    if len(loud) > len(PALETTE):
        by_total = sorted(loud, key=lambda name: -math.fsum(checked[name]))
        kept = set(by_total[: len(PALETTE) - 1])
        folded = [name for name in loud if name not in kept]
        loud = [name for name in loud if name in kept]
    layers = [
        _Layer(name, checked[name], colour) for name, colour in zip(loud, PALETTE, strict=False)
    ]
    if folded:
        others = tuple(
            math.fsum(column) for column in zip(*(checked[n] for n in folded), strict=True)
        )
        layers.append(_Layer(f"{len(folded)} others", others, PALETTE[-1]))
    layers += [_Layer(name, checked[name], _HATCH) for name in checked if name in muted]
    return _bar_chart(labels, layers, title=title, unit=unit, width=width, height=height)


def bars(
    labels: Sequence[str],
    values: Sequence[float],
    *,
    title: str,
    unit: str,
    width: int = 960,
    height: int = 320,
) -> str:
    """One plain bar per label, e.g. requests per day or promotions per week."""
    names = [str(label) for label in labels]
    layer = _Layer("", _checked(values, len(names), title), PALETTE[0])
    return _bar_chart(names, [layer], title=title, unit=unit, width=width, height=height)


def sparkline(
    values: Sequence[float], *, title: str, unit: str = "", width: int = 160, height: int = 40
) -> str:
    """A small line from zero to the maximum, for an overview tile; no axes."""
    points = _checked(values, len(values), title)
    if width < 16 or height < 8:
        raise ValueError(f"a sparkline needs at least 16x8, not {width}x{height}")
    if points and max(points) > 0:
        desc = (
            f"{len(points)} points. Total {_num(math.fsum(points), unit)}; "
            f"from {_num(min(points), unit)} to {_num(max(points), unit)}; "
            f"last {_num(points[-1], unit)}."
        )
    else:
        desc = "No data." if not points else f"{len(points)} points, all zero."
    uid = _uid("sparkline", title, unit, points)
    out = _open(uid, title, desc, width, height)
    pad, top = 2.0, max(points, default=0.0) or 1.0
    span_x, span_y = width - 2 * pad, height - 2 * pad
    if len(points) > 1:
        xs = [pad + i * span_x / (len(points) - 1) for i in range(len(points))]
        ys = [height - pad - v * span_y / top for v in points]
    else:  # one value (or none) is a level, drawn across the tile
        level = height - pad - (points[0] if points else 0.0) * span_y / top
        xs, ys = [pad, width - pad], [level, level]
    coords = " ".join(f"{_r(x)},{_r(y)}" for x, y in zip(xs, ys, strict=True))
    out.append(
        f'<polyline class="chart-line" points="{coords}" fill="none" '
        f'stroke="{PALETTE[0]}" stroke-width="1.5" stroke-linejoin="round"/>'
    )
    if points:
        out.append(f'<circle cx="{_r(xs[-1])}" cy="{_r(ys[-1])}" r="2" fill="{PALETTE[0]}"/>')
    return "".join([*out, "</svg>"])


def _bar_chart(
    labels: list[str], layers: list[_Layer], *, title: str, unit: str, width: int, height: int
) -> str:
    totals = [math.fsum(layer.values[i] for layer in layers) for i in range(len(labels))]
    uid = _uid("bars", title, unit, labels, layers)
    out = _open(uid, title, _summary(labels, totals, layers, unit), width, height)
    if any(layer.fill == _HATCH for layer in layers):
        out.append(
            f'<defs><pattern id="{uid}-hatch" width="6" height="6" '
            'patternUnits="userSpaceOnUse" patternTransform="rotate(45)">'
            '<rect width="6" height="6" fill="#EEEEEE"/>'
            f'<line x1="1.5" y1="0" x2="1.5" y2="6" stroke="{_AXIS}" stroke-width="3"/>'
            "</pattern></defs>"
        )
    out.append(
        f'<text class="chart-title" x="{_LEFT}" y="18" font-weight="bold">{_e(title)}</text>'
    )
    legend_bottom = 30.0
    if len(layers) > 1:
        legend, legend_bottom = _legend(layers, uid, width)
        out.append(legend)
    top = legend_bottom + 16
    base, right = height - _BOTTOM, width - _RIGHT
    if base - top < 40 or right - _LEFT < 40:
        raise ValueError(f"{width}x{height} leaves no room for the plot of {title!r}")
    axis_top, ticks = _nice_ticks(max(totals, default=0.0))
    scale = (base - top) / axis_top

    out.append('<g class="chart-axis">')
    out.append(f'<text x="4" y="{_r(top - 8)}">{_e(unit)}</text>')
    for tick in ticks:
        y = _r(base - tick * scale)
        out.append(
            f'<line class="chart-grid" x1="{_LEFT}" y1="{y}" x2="{right}" y2="{y}" '
            f'stroke="{_GRID}"/>'
        )
        out.append(f'<text x="{_LEFT - 6}" y="{_r(y + 4)}" text-anchor="end">{_tick(tick)}</text>')
    out.append(f'<line x1="{_LEFT}" y1="{top}" x2="{_LEFT}" y2="{base}" stroke="{_AXIS}"/>')
    out.append(f'<line x1="{_LEFT}" y1="{base}" x2="{right}" y2="{base}" stroke="{_AXIS}"/>')
    slot = (right - _LEFT) / max(len(labels), 1)
    widest = min(max((len(label) for label in labels), default=0), _LABEL_CHARS)
    half = (widest * _CHAR_W) / 2
    every = max(1, math.ceil((2 * half + 8) / slot))  # thin the labels so none overlap
    last_end = 0.0
    for i in range(0, len(labels), every):
        x = min(_LEFT + (i + 0.5) * slot, width - half - 2)  # the last one kept in view
        if x - half < last_end + 8:
            continue
        last_end = x + half
        out.append(f'<text x="{_r(x)}" y="{_r(base + 16)}" text-anchor="middle">')
        out.append(_clipped(labels[i], _LABEL_CHARS) + "</text>")
    out.append("</g>")

    if not any(totals):
        out.append(
            f'<text class="chart-empty" x="{_r((_LEFT + right) / 2)}" y="{_r((top + base) / 2)}" '
            'text-anchor="middle">No data</text>'
        )
        return "".join([*out, "</svg>"])
    bar_w = min(slot * 0.8, 64.0)
    gap = ' stroke="#FFFFFF" stroke-width="1"' if bar_w >= 6 else ""  # parts stay apart
    out.append('<g class="chart-bars">')
    for i, label in enumerate(labels):
        x, below = _r(_LEFT + (i + 0.5) * slot - bar_w / 2), 0.0
        for layer in layers:
            value = layer.values[i]
            if value == 0:
                continue
            y_low, y_high = _r(base - below * scale), _r(base - (below + value) * scale)
            below += value
            muted = layer.fill == _HATCH
            fill = f"url(#{uid}-hatch)" if muted else layer.fill
            name = f"{label}, {layer.name}" if layer.name else label
            out.append(
                f'<rect class="chart-bar{" chart-bar-muted" if muted else ""}" x="{x}" '
                f'y="{y_high}" width="{_r(bar_w)}" height="{_r(y_low - y_high)}" '
                f'fill="{fill}"{gap}>'
                f"<title>{_e(name)}: {_e(_num(value, unit))}</title></rect>"
            )
    out.append("</g>")
    return "".join([*out, "</svg>"])


def _legend(layers: list[_Layer], uid: str, width: int) -> tuple[str, float]:
    """The legend's markup, laid out in rows across the top, and where it ends."""
    out, x, y = ['<g class="chart-legend">'], _LEFT, 30.0
    for layer in layers:
        shown = min(len(layer.name), _LEGEND_CHARS)
        item_w = 20 + shown * _CHAR_W + 16
        if x > _LEFT and x + item_w > width - _RIGHT:
            x, y = _LEFT, y + 18
        fill = f"url(#{uid}-hatch)" if layer.fill == _HATCH else layer.fill
        out.append(f'<rect x="{_r(x)}" y="{_r(y)}" width="14" height="12" fill="{fill}"/>')
        out.append(f'<text x="{_r(x + 20)}" y="{_r(y + 10)}">')
        out.append(_clipped(layer.name, _LEGEND_CHARS) + "</text>")
        x += item_w
    out.append("</g>")
    return "".join(out), y + 18


def _summary(labels: list[str], totals: list[float], layers: list[_Layer], unit: str) -> str:
    if not any(totals):
        return "No data." if not labels else f"{len(labels)} bars, all zero: no data."
    high = max(range(len(totals)), key=totals.__getitem__)
    low = min(range(len(totals)), key=totals.__getitem__)
    text = (
        f"{len(labels)} bars, {labels[0]} to {labels[-1]}. "
        f"Total {_num(math.fsum(totals), unit)}; highest {_num(totals[high], unit)} "
        f"({labels[high]}); lowest {_num(totals[low], unit)} ({labels[low]})."
    )
    if len(layers) > 1:
        hatched = [layer.name for layer in layers if layer.fill == _HATCH]
        text += f" Series: {', '.join(layer.name for layer in layers)}."
        text += f" Hatched: {', '.join(hatched)}." if hatched else ""
    return text


def _open(uid: str, title: str, desc: str, width: int, height: int) -> list[str]:
    # No height attribute: with width 100% the viewBox keeps the aspect ratio.
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" '
        f'viewBox="0 0 {width} {height}" width="100%" aria-labelledby="{uid}-title {uid}-desc" '
        f'font-family="system-ui, sans-serif" font-size="12" fill="{_TEXT}">',
        f'<title id="{uid}-title">{_e(title)}</title><desc id="{uid}-desc">{_e(desc)}</desc>',
    ]


def _nice_ticks(maximum: float, target: int = 5) -> tuple[float, list[float]]:
    """The axis top and its ticks, in steps of 1, 2 or 5 x 10^k, the top >= maximum."""
    if maximum <= 0:
        return 1.0, [0.0]  # the scale must not divide by zero; one tick at the baseline
    raw = maximum / target
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    count = math.ceil(maximum / step)
    count += count * step < maximum  # a product rounded down by the last bit
    return count * step, [i * step for i in range(count + 1)]


def _checked(values: Iterable[float], length: int, name: str) -> tuple[float, ...]:
    checked = tuple(float(v) for v in values)
    if len(checked) != length:
        raise ValueError(f"{name!r} has {len(checked)} values for {length} labels")
    for i, value in enumerate(checked):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name!r}: value {value!r} at {i} is not finite and >= 0")
    return checked


def _clipped(text: str, limit: int) -> str:
    """Escaped text, shortened with an ellipsis; the full text goes in a <title>."""
    if len(text) <= limit:
        return _e(text)
    return f"<title>{_e(text)}</title>{_e(text[: limit - 1])}\u2026"


def _uid(*parts: object) -> str:
    # Derived from the content, so renders are reproducible; ids only collide for two
    # identical charts on one page, which would then also have identical patterns.
    return "chart-" + hashlib.blake2s(repr(parts).encode(), digest_size=5).hexdigest()


def _tick(value: float) -> str:
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= size:
            return f"{round(value / size, 6):g}{suffix}"
    return f"{round(value, 9):g}"


def _num(value: float, unit: str) -> str:
    text = f"{value:,.0f}" if value >= 1e6 else f"{value:,.6g}"
    return f"{text} {unit}" if unit else text


def _e(text: str) -> str:
    return escape(text, quote=True)


def _r(value: float) -> float:
    return round(value, 2)
