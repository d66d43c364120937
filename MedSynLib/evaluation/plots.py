"""PNG plots drawn with Pillow (matplotlib is not a dependency): histograms and distributions.

- `histogram_plot`: real vs generated HU histograms (densities, one line each).
- `distribution_plot`: per structure, the values of each set as dots over a box (quartiles,
  median) on a shared horizontal axis per row, e.g. structure volumes in mL.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from MedSynLib.compat import zip_strict

COLORS = {"real": (31, 119, 180), "fake": (214, 39, 40)}
_BACKGROUND = (255, 255, 255)
_AXIS = (60, 60, 60)
_GRID = (225, 225, 225)


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    if not np.isfinite(low) or not np.isfinite(high) or high <= low:
        return [low]
    raw = (high - low) / count
    magnitude = 10 ** np.floor(np.log10(raw))
    step = min((m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw), default=raw)
    first = np.ceil(low / step) * step
    return [float(t) for t in np.arange(first, high + step * 1e-9, step)]


def _label(value: float) -> str:
    return f"{value:g}" if abs(value) < 1e5 else f"{value:.2e}"


def histogram_plot(path: str | Path, edges: np.ndarray, densities: dict[str, np.ndarray], *,
                   title: str = "HU histogram", size: tuple[int, int] = (720, 420)) -> Path:
    """One line per set (name -> density per bin) over shared bin edges."""
    width, height = size
    left, right, top, bottom = 60, 20, 40, 50
    image = Image.new("RGB", size, _BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = _font()
    centres = (edges[:-1] + edges[1:]) / 2
    y_max = max((float(np.max(d)) for d in densities.values() if len(d)), default=1.0) or 1.0

    def to_xy(x: float, y: float) -> tuple[float, float]:
        return (left + (x - edges[0]) / (edges[-1] - edges[0]) * (width - left - right),
                height - bottom - y / y_max * (height - top - bottom))

    for tick in _nice_ticks(float(edges[0]), float(edges[-1]), 8):
        x, _ = to_xy(tick, 0)
        draw.line([(x, top), (x, height - bottom)], fill=_GRID)
        draw.text((x - 12, height - bottom + 6), _label(tick), fill=_AXIS, font=font)
    draw.rectangle([left, top, width - right, height - bottom], outline=_AXIS)
    for index, (name, density) in enumerate(densities.items()):
        color = COLORS.get(name, (44, 160, 44))
        points = [to_xy(float(x), float(y)) for x, y in zip_strict(centres, density)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        draw.rectangle([width - right - 110, top + 8 + 16 * index, width - right - 96, top + 18 + 16 * index], fill=color)
        draw.text((width - right - 90, top + 6 + 16 * index), name, fill=_AXIS, font=font)
    draw.text((left, 12), title, fill=_AXIS, font=font)
    draw.text((width // 2 - 20, height - 22), "HU", fill=_AXIS, font=font)
    image.save(path)
    return Path(path)


def distribution_plot(path: str | Path, rows: dict[str, dict[str, list[float]]], *, unit: str = "",
                      title: str = "", row_height: int = 70, width: int = 720) -> Path:
    """rows: row label -> {set name -> values}; each row has its own horizontal axis."""
    left, right, top = 150, 30, 40
    height = top + row_height * max(len(rows), 1) + 20
    image = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = _font()
    draw.text((10, 12), f"{title} ({unit})" if unit else title, fill=_AXIS, font=font)
    for r, (label, sets) in enumerate(rows.items()):
        y0 = top + r * row_height
        values = [v for vs in sets.values() for v in vs if np.isfinite(v)]
        draw.text((10, y0 + row_height // 2 - 6), label, fill=_AXIS, font=font)
        if not values:
            continue
        low, high = min(values), max(values)
        pad = (high - low) * 0.05 or abs(high) * 0.05 or 1.0
        low, high = low - pad, high + pad

        def to_x(v: float, low: float = low, high: float = high) -> float:
            return left + (v - low) / (high - low) * (width - left - right)

        draw.line([(left, y0 + row_height - 14), (width - right, y0 + row_height - 14)], fill=_AXIS)
        for tick in _nice_ticks(low, high, 5):
            x = to_x(tick)
            draw.line([(x, y0 + row_height - 16), (x, y0 + row_height - 12)], fill=_AXIS)
            draw.text((x - 10, y0 + row_height - 12), _label(tick), fill=_AXIS, font=font)
        for s, (name, vs) in enumerate(sets.items()):
            vs = np.asarray([v for v in vs if np.isfinite(v)], dtype=float)
            if not vs.size:
                continue
            color = COLORS.get(name, (44, 160, 44))
            yc = y0 + 12 + s * 20
            q1, median, q3 = np.percentile(vs, [25, 50, 75])
            draw.rectangle([to_x(q1), yc - 6, max(to_x(q3), to_x(q1) + 1), yc + 6], outline=color)
            draw.line([(to_x(median), yc - 7), (to_x(median), yc + 7)], fill=color, width=2)
            for v in vs:
                x = to_x(float(v))
                draw.ellipse([x - 2, yc - 2, x + 2, yc + 2], fill=color)
            draw.text((left - 40, yc - 6), name, fill=color, font=font)
    image.save(path)
    return Path(path)
