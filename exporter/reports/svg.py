"""The cold-versus-warm time-to-first-token chart: inline SVG, no script, no assets.

Grouped bars (cold beside warm) on a shared axis that starts at zero, so the cache's
benefit reads as the gap between the two bars. Every bar carries its exact value as an
SVG ``<title>`` (a tooltip in browsers, text for screen readers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

COLD_COLOUR = "#4e79a7"
WARM_COLOUR = "#f28e2b"
_WIDTH, _HEIGHT = 760, 260
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 16, 28, 44
_MAX_LABELS = 12


@dataclass(frozen=True, slots=True)
class Pair:
    """One group of the chart: a label and its cold and warm TTFT in seconds."""

    label: str
    cold: float | None
    warm: float | None


def _nice_ceiling(value: float) -> float:
    """1, 2 or 5 times a power of ten, at or above ``value``."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if value <= step * power:
            return float(step * power)
    return float(10 * power)  # pragma: no cover - the loop always returns


def _tick(value: float, top: float) -> str:
    return f"{value * 1000:g} ms" if top < 1 else f"{value:g} s"


def ttft_chart(pairs: Sequence[Pair], *, title: str, element_id: str = "ttft-chart") -> str:
    values = [v for p in pairs for v in (p.cold, p.warm) if v is not None]
    head = (
        f'<svg id="{escape(element_id)}" class="chart" role="img" '
        f'viewBox="0 0 {_WIDTH} {_HEIGHT}" width="100%" xmlns="http://www.w3.org/2000/svg">'
        f"<title>{escape(title)}</title>"
    )
    if not values:
        return (
            head + f'<text x="{_WIDTH / 2}" y="{_HEIGHT / 2}" text-anchor="middle" '
            'fill="#555">no time to first token measured (streaming off or not '
            "supported)</text></svg>"
        )
    top = _nice_ceiling(max(values) * 1.05)
    plot_w = _WIDTH - _LEFT - _RIGHT
    plot_h = _HEIGHT - _TOP - _BOTTOM
    parts = [head]

    def y(value: float) -> float:
        return _TOP + plot_h * (1 - value / top)

    for i in range(5):
        value = top * i / 4
        parts.append(
            f'<line x1="{_LEFT}" x2="{_WIDTH - _RIGHT}" y1="{y(value):.1f}" y2="{y(value):.1f}" '
            f'stroke="#ddd"/><text x="{_LEFT - 6}" y="{y(value) + 4:.1f}" text-anchor="end" '
            f'font-size="11" fill="#444">{escape(_tick(value, top))}</text>'
        )
    group = plot_w / len(pairs)
    bar = max(0.5, group * 0.38)
    every = max(1, math.ceil(len(pairs) / _MAX_LABELS))
    for i, pair in enumerate(pairs):
        x0 = _LEFT + i * group + (group - 2 * bar) / 2
        for offset, kind, colour, measured in (
            (0.0, "cold", COLD_COLOUR, pair.cold),
            (bar, "warm", WARM_COLOUR, pair.warm),
        ):
            if measured is None:
                continue
            value = measured
            parts.append(
                f'<rect class="bar {kind}" x="{x0 + offset:.2f}" y="{y(value):.2f}" '
                f'width="{bar:.2f}" height="{max(0.0, plot_h - (y(value) - _TOP)):.2f}" '
                f'fill="{colour}"><title>{escape(pair.label)}: {kind} '
                f"{value * 1000:.1f} ms</title></rect>"
            )
        if i % every == 0:
            parts.append(
                f'<text x="{_LEFT + (i + 0.5) * group:.1f}" y="{_HEIGHT - _BOTTOM + 16}" '
                f'text-anchor="middle" font-size="11" fill="#444">{escape(pair.label)}</text>'
            )
    parts.append(
        f'<line x1="{_LEFT}" x2="{_WIDTH - _RIGHT}" y1="{_TOP + plot_h}" y2="{_TOP + plot_h}" '
        'stroke="#888"/>'
    )
    legend_x = _WIDTH - _RIGHT - 150
    for j, (kind, colour) in enumerate((("cold", COLD_COLOUR), ("warm", WARM_COLOUR))):
        x = legend_x + j * 75
        parts.append(
            f'<rect x="{x}" y="8" width="12" height="12" fill="{colour}"/>'
            f'<text x="{x + 16}" y="18" font-size="12" fill="#222">{kind}</text>'
        )
    parts.append(
        f'<text x="{_LEFT}" y="18" font-size="12" fill="#222">time to first token</text></svg>'
    )
    return "".join(parts)
