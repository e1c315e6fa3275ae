"""``evaluate --html``: one self-contained page (inline SVG and PNG, no script, no CDN) of the audit.

The reliability diagram before and after calibration, the confusion matrix, the distribution score's
histograms with the threshold, the per-band bars of the skin-tone table, the deletion and insertion
curves beside their baselines, and the most confident errors with their heatmaps.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dermal_fn.core import trust

WIDTH, HEIGHT, PAD = 360, 240, 36
COLOURS = {
    "gradcam": "#c0392b",
    "random": "#7f8c8d",
    "centre": "#2e86c1",
    "before": "#b9770e",
    "after": "#1e8449",
}

STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #17202a; margin: 0;
  background: #f4f6f8; }
main { max-width: 1100px; margin: 0 auto; padding: 24px; }
h1 { font-size: 1.5rem; margin: 0 0 4px; } h2 { font-size: 1.1rem; margin: 0 0 8px; }
.sub { color: #56616e; margin: 0 0 20px; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(340px, 1fr)); gap: 16px; }
section { background: #fff; border: 1px solid #dce1e7; border-radius: 10px; padding: 16px; }
table { border-collapse: collapse; font-size: 0.9rem; width: 100%; }
th, td { border-bottom: 1px solid #e5e8ec; padding: 4px 6px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.thin td { color: #8a939c; font-style: italic; }
.note { color: #56616e; font-size: 0.85rem; margin: 8px 0 0; }
.gallery { display: flex; flex-wrap: wrap; gap: 12px; }
.gallery figure { margin: 0; width: 160px; font-size: 0.8rem; }
.gallery img { width: 160px; border-radius: 6px; display: block; }
svg text { font: 11px system-ui, sans-serif; fill: #56616e; }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _fmt(value: Any, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else _esc(value)


def _axes(
    title_x: str, title_y: str, *, y_max: float = 1.0, x_max: float = 1.0, x_ticks: bool = True
) -> list[str]:
    x0, y0, x1, y1 = PAD, HEIGHT - PAD, WIDTH - 10, 10
    parts = [
        f'<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}" stroke="#999"/>',
        f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}" stroke="#999"/>',
        f'<text x="{(x0 + x1) / 2}" y="{HEIGHT - 6}" text-anchor="middle">{_esc(title_x)}</text>',
        f'<text x="12" y="{(y0 + y1) / 2}" text-anchor="middle" transform="rotate(-90 12 {(y0 + y1) / 2})">{_esc(title_y)}</text>',
    ]
    for k in range(5):
        fy = k / 4
        y = y0 - fy * (y0 - y1)
        parts.append(f'<text x="{x0 - 4}" y="{y + 4}" text-anchor="end">{fy * y_max:.2g}</text>')
        x = x0 + fy * (x1 - x0)
        if x_ticks:
            parts.append(f'<text x="{x}" y="{y0 + 14}" text-anchor="middle">{fy * x_max:.2g}</text>')
    return parts


def _point(fx: float, fy: float) -> tuple[float, float]:
    return PAD + fx * (WIDTH - 10 - PAD), (HEIGHT - PAD) - fy * (HEIGHT - PAD - 10)


def _svg(parts: Sequence[str], label: str) -> str:
    return f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" role="img" aria-label="{_esc(label)}">{"".join(parts)}</svg>'


def _legend(items: Sequence[tuple[str, str]]) -> list[str]:
    out = []
    for i, (name, colour) in enumerate(items):
        x, y = WIDTH - 150, 16 + 14 * i
        out.append(
            f'<rect x="{x}" y="{y - 5}" width="12" height="4" fill="{colour}"/><text x="{x + 16}" y="{y}">{_esc(name)}</text>'
        )
    return out


def reliability(before: np.ndarray, after: np.ndarray, truth: np.ndarray, *, bins: int = 10) -> str:
    """Accuracy against confidence, in bins, before and after calibration (the diagonal is perfect)."""
    parts = _axes("confidence", "accuracy")
    x0, y0 = _point(0, 0)
    x1, y1 = _point(1, 1)
    parts.append(f'<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y1}" stroke="#bbb" stroke-dasharray="4 3"/>')
    for name, probabilities in (("before", before), ("after", after)):
        confidence = probabilities.max(axis=1)
        correct = probabilities.argmax(axis=1) == truth
        points = []
        for b in range(bins):
            inside = (confidence > b / bins) & (confidence <= (b + 1) / bins)
            if inside.any():
                points.append(_point(float(confidence[inside].mean()), float(correct[inside].mean())))
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{COLOURS[name]}" stroke-width="2"/>')
        parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{COLOURS[name]}"/>' for x, y in points]
    ece_before, ece_after = trust.ece(before, truth), trust.ece(after, truth)
    parts += _legend(
        [
            (f"before (ECE {ece_before:.3f})", COLOURS["before"]),
            (f"after ({ece_after:.3f})", COLOURS["after"]),
        ]
    )
    return _svg(parts, "reliability diagram")


def confusion(labels: Sequence[str], truth: np.ndarray, predicted: np.ndarray) -> str:
    """The confusion matrix as a table, rows the truth, shaded by the row's share."""
    n = len(labels)
    counts = np.zeros((n, n), dtype=int)
    for t, p in zip(truth, predicted, strict=True):
        counts[t, p] += 1
    head = "".join(f'<th title="{_esc(label)}">{j}</th>' for j, label in enumerate(labels))
    rows = []
    for i, label in enumerate(labels):
        total = max(int(counts[i].sum()), 1)
        cells = "".join(
            f'<td style="background: rgba({"30,132,73" if i == j else "192,57,43"},{counts[i, j] / total:.2f})">{counts[i, j]}</td>'
            for j in range(n)
        )
        rows.append(f"<tr><th>{i} {_esc(label)}</th>{cells}</tr>")
    return f"<table><tr><th>truth \\ predicted</th>{head}</tr>{''.join(rows)}</table>"


def histograms(inside: np.ndarray, outside: np.ndarray | None, threshold: float) -> str:
    """The distribution score of --data (and --ood) photos, with the threshold."""
    values = np.concatenate([inside, outside]) if outside is not None else inside
    high = float(np.quantile(values, 0.99)) * 1.1 or 1.0
    edges = np.linspace(0.0, high, 31)
    parts = _axes("distribution score", "share of photos", x_max=high)
    for scores, colour in (
        (inside, COLOURS["after"]),
        (outside, COLOURS["gradcam"]),
    ):
        if scores is None or not len(scores):
            continue
        counts, _ = np.histogram(np.clip(scores, 0, high), bins=edges)
        shares = counts / counts.sum()
        top = max(float(shares.max()), 1e-9)
        for k, share in enumerate(shares):
            xa, ya = _point(edges[k] / high, share / top)
            xb, yb = _point(edges[k + 1] / high, 0)
            parts.append(
                f'<rect x="{xa:.1f}" y="{ya:.1f}" width="{xb - xa:.1f}" height="{yb - ya:.1f}" fill="{colour}" opacity="0.55"/>'
            )
    xt, _ = _point(min(threshold / high, 1.0), 0)
    parts.append(
        f'<line x1="{xt:.1f}" y1="10" x2="{xt:.1f}" y2="{HEIGHT - PAD}" stroke="#17202a" stroke-dasharray="3 2"/>'
    )
    parts.append(f'<text x="{xt + 4:.1f}" y="30">threshold {threshold:.3g}</text>')
    parts += _legend(
        [("--data", COLOURS["after"])] + ([("--ood", COLOURS["gradcam"])] if outside is not None else [])
    )
    return _svg(parts, "distribution score histograms")


def curves(explanations: dict[str, Any], which: str) -> str:
    """Deletion or insertion curves of Grad-CAM and its baselines."""
    parts = _axes("share of cells " + ("removed" if which == "deletion" else "added"), "class probability")
    legend = []
    for kind in ("gradcam", "random", "centre"):
        values = explanations["curves"][kind][f"{which}_curve"]
        points = [_point(k / (len(values) - 1), v) for k, v in enumerate(values)]
        parts.append(
            f'<polyline points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in points)}" fill="none" stroke="{COLOURS[kind]}" stroke-width="2"/>'
        )
        auc = (
            explanations[f"{which}_auc"]
            if kind == "gradcam"
            else explanations["baselines"][kind][f"{which}_auc"]
        )
        legend.append((f"{'Grad-CAM' if kind == 'gradcam' else kind} {auc:.3f}", COLOURS[kind]))
    parts += _legend(legend)
    return _svg(parts, f"{which} curves")


def bands(skin_tone: dict[str, Any]) -> str:
    """Balanced accuracy per ITA band (thin bands greyed), as bars."""
    groups = skin_tone["groups"]
    parts = _axes("", "balanced accuracy", x_ticks=False)
    slot = (WIDTH - 10 - PAD) / len(groups)
    for k, group in enumerate(groups):
        value = group["balanced_accuracy"]
        x = PAD + k * slot + 4
        if value is not None:
            _, y = _point(0, value)
            colour = COLOURS["after"] if group["enough"] else "#c8ced4"
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{slot - 8:.1f}" height="{HEIGHT - PAD - y:.1f}" fill="{colour}"/>'
            )
        parts.append(
            f'<text x="{x + (slot - 8) / 2:.1f}" y="{HEIGHT - PAD + 26}" text-anchor="middle">{_esc(group["group"])}</text>'
        )
    return _svg(parts, "balanced accuracy per skin-tone band")


def write_report(
    path: Path,
    report: dict[str, Any],
    *,
    labels: Sequence[str],
    truth: np.ndarray,
    before: np.ndarray,
    after: np.ndarray,
    inside_scores: np.ndarray | None,
    outside_scores: np.ndarray | None,
    distribution_threshold: float | None,
    errors: Sequence[dict[str, Any]],
) -> Path:
    """Write the page; its path."""
    explanations, skin = report["explanations"], report["skin_tone"]
    gap = skin["equity_gap"]
    rows = "".join(
        f'<tr class="{"" if g["enough"] else "thin"}"><td>{_esc(g["group"])}</td><td>{g["ita_range"][0]:g} – {g["ita_range"][1]:g}</td>'
        f"<td>{g['images']}</td><td>{_fmt(g['balanced_accuracy'])}</td><td>{_fmt(g['ece'])}</td>"
        f"<td>{_fmt(g['abstentions'])}</td><td>{_fmt(g['flagged_out'])}</td><td>{_fmt(g['flagged_too_dark'])}</td></tr>"
        for g in skin["groups"]
    )
    gallery = (
        "".join(
            f'<figure><img alt="heatmap of a confident error" src="data:image/png;base64,{e["overlay_png"]}">'
            f"<figcaption>predicted <b>{_esc(e['predicted'])}</b> ({e['probability']:.0%}), truly {_esc(e['truth'])}</figcaption></figure>"
            for e in errors
        )
        or "<p class='note'>No errors among the photos.</p>"
    )
    distribution = (
        histograms(inside_scores, outside_scores, distribution_threshold)
        if inside_scores is not None and distribution_threshold is not None
        else "<p class='note'>The bundle is not calibrated: no distribution score.</p>"
    )
    randomization = explanations["randomization"]
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Audit of {_esc(report["bundle"])}</title><style>{STYLE}</style></head>
<body><main>
<h1>Audit of {_esc(report["bundle"])}</h1>
<p class="sub">{report["images"]} photos · balanced accuracy {_fmt(report["balanced_accuracy"])} · ECE {_fmt(report["ece"])} ·
{"calibrated" if report["calibrated"] else "not calibrated"}. Not a clinical validation: these photos are only as representative as the folder.</p>
<div class="grid">
<section><h2>Reliability</h2>{reliability(before, after, truth)}</section>
<section><h2>Confusion matrix</h2>{confusion(labels, truth, after.argmax(axis=1))}</section>
<section><h2>Unlike the calibration data?</h2>{distribution}</section>
<section><h2>Deletion (lower is more faithful)</h2>{curves(explanations, "deletion")}</section>
<section><h2>Insertion (higher is more faithful)</h2>{curves(explanations, "insertion")}
<p class="note">{explanations["images"]} photos; Grad-CAM {"beats" if explanations["beats_random"] else "does not beat"} random maps on both curves.
Model randomization: Spearman {_fmt(randomization["spearman"])} between the maps before and after re-drawing the head's weights.</p></section>
<section><h2>Skin tone (ITA°)</h2>{bands(skin)}
<p class="note">Equity gap in balanced accuracy: {_fmt(gap["balanced_accuracy"])}{f" ({_esc(gap['best'])} vs {_esc(gap['worst'])})" if gap["best"] else ""};
bands under {skin["min_images"]} photos are grey and not compared.</p></section>
</div>
<section style="margin-top:16px"><h2>Per band</h2>
<table><tr><th>band</th><th>ITA°</th><th>photos</th><th>balanced accuracy</th><th>ECE</th><th>abstained</th><th>flagged out</th><th>too dark</th></tr>{rows}</table>
<p class="note">{_esc(skin["method"])}.{(" " + _esc(skin["caveat"]) + ".") if skin["caveat"] else ""}</p></section>
<section style="margin-top:16px"><h2>The most confident errors</h2><div class="gallery">{gallery}</div></section>
</main></body></html>
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
