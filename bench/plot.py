"""RSS over time per configuration, drawn with Pillow (axes, grid, lines, limit lines, legend)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLOURS = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)


def _nice_step(span: float, ticks: int) -> float:
    raw = span / max(ticks, 1)
    magnitude = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    for factor in (1, 2, 2.5, 5, 10):
        if factor * magnitude >= raw:
            return factor * magnitude
    return 10 * magnitude


def rss_plot(
    series: Mapping[str, Sequence[tuple[float, float]]],
    out: Path,
    *,
    title: str,
    limits: Mapping[str, float] | None = None,
    size: tuple[int, int] = (1200, 700),
) -> Path:
    """Draw each series of (seconds, MB) as a line, dashed horizontal ``limits`` (label -> MB), a legend."""
    width, height = size
    left, right, top, bottom = 80, 280, 50, 60
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    limits = dict(limits or {})
    x_max = max((t for points in series.values() for t, _ in points), default=1.0) or 1.0
    y_max = max([mb for points in series.values() for _, mb in points] + list(limits.values()) + [1.0])
    y_step = _nice_step(y_max * 1.05, 8)
    y_top = math.ceil(y_max * 1.05 / y_step) * y_step
    x_step = _nice_step(x_max, 10)
    x_right = math.ceil(x_max / x_step) * x_step
    plot_w, plot_h = width - left - right, height - top - bottom

    def to_px(t: float, mb: float) -> tuple[float, float]:
        return left + plot_w * t / x_right, top + plot_h * (1 - mb / y_top)

    grid, axis = (225, 225, 225), (60, 60, 60)
    y = 0.0
    while y <= y_top + 1e-9:
        _, py = to_px(0, y)
        draw.line([(left, py), (left + plot_w, py)], fill=grid)
        draw.text((left - 8, py), f"{y:g}", fill=axis, font=font, anchor="rm")
        y += y_step
    x = 0.0
    while x <= x_right + 1e-9:
        px, _ = to_px(x, 0)
        draw.line([(px, top), (px, top + plot_h)], fill=grid)
        draw.text((px, top + plot_h + 8), f"{x:g}", fill=axis, font=font, anchor="mt")
        x += x_step
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline=axis)
    draw.text(
        (left + plot_w / 2, height - 20),
        "seconds since the server was spawned",
        fill=axis,
        font=font,
        anchor="mm",
    )
    draw.text((12, top + plot_h / 2), "RSS\n(MB)", fill=axis, font=font, anchor="lm")
    draw.text((left + plot_w / 2, 22), title, fill=(0, 0, 0), font=font, anchor="mm")

    for label, mb in limits.items():
        _, py = to_px(0, mb)
        for x0 in range(left, left + plot_w, 12):
            draw.line([(x0, py), (min(x0 + 6, left + plot_w), py)], fill=(120, 0, 0), width=1)
        draw.text((left + plot_w - 4, py - 4), label, fill=(120, 0, 0), font=font, anchor="rb")

    legend_y = top
    for index, (label, points) in enumerate(series.items()):
        colour = COLOURS[index % len(COLOURS)]
        pixels = [to_px(t, mb) for t, mb in points]
        if len(pixels) >= 2:
            draw.line(pixels, fill=colour, width=2, joint="curve")
        elif pixels:
            px, py = pixels[0]
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
        peak = max((mb for _, mb in points), default=0.0)
        lx = left + plot_w + 16
        draw.line([(lx, legend_y + 6), (lx + 24, legend_y + 6)], fill=colour, width=3)
        draw.text((lx + 30, legend_y), f"{label}\n  max {peak:.0f} MB", fill=(0, 0, 0), font=font)
        legend_y += 34
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, format="PNG", optimize=True)
    return out
