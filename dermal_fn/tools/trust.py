"""``calibrate``: fit a bundle's trust signals by running the bundle itself (``evaluate`` measures them).

    python -m dermal_fn calibrate BUNDLE --data DIR --out OUT [--target-accuracy 0.9]
    python -m dermal_fn evaluate BUNDLE --data DIR [--ood DIR] [--json OUT]

No TensorFlow: the LiteRT engine runs every image exactly as the server decodes it, so the figures
hold for every quantization. ``calibrate`` holds out a fifth of each class, fits on the rest
(temperature by NLL, the distribution statistics and their threshold, the abstention threshold) and
reports ECE/NLL before and after on the held-out part; the new bundle has the same backbone and
head and a ``calibration`` manifest section.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from dermal_fn.core import bundle as bundle_format
from dermal_fn.core import imaging, trust
from dermal_fn.core.engine import LiteRTEngine
from dermal_fn.errors import DatasetError, DermalError
from dermal_fn.tools.folders import labelled_files

logger = logging.getLogger(__name__)

HOLDOUT_SHARE = 0.2
MIN_IMAGES_PER_CLASS = 4


@dataclass(frozen=True)
class Outputs:
    """What the bundle gives for a folder: logits, reported probabilities, pooled features."""

    logits: np.ndarray  # (N, K_logits)
    probabilities: np.ndarray  # (N, K) reported: calibrated when the bundle is
    pooled: np.ndarray  # (N, C)
    labels: np.ndarray  # (N,), -1 for unlabelled
    skipped: int  # files that were not decodable images


def run_files(
    engine: LiteRTEngine,
    files: Sequence[tuple[Path, int]],
    *,
    progress: TextIO | None = sys.stderr,
    visit: Callable[..., None] | None = None,
) -> Outputs:
    """Decode each file as the server does, run the bundle, keep what calibration and evaluation need.

    ``visit`` (the audit) is called for each decoded photo with its RGB, size, model input, feature
    map, the head's result, reported probabilities and label, in the order of the outputs.
    """
    info = engine.info
    logits, reported, pooled, labels = [], [], [], []
    skipped = 0
    bar = Progress(len(files), stream=progress)
    for path, label in files:
        bar.step()
        try:
            decoded = imaging.decode(path.read_bytes(), min_side=imaging.decode_side(info.input_size))
        except (DermalError, OSError):
            skipped += 1
            continue
        pixels = info.model_input(decoded.rgb)
        features = engine.feature_map(pixels)
        result = engine.head.forward(features)
        logits.append(result.logits)
        reported.append(engine.reported(result.logits, result.probabilities))
        if visit is not None:
            visit(
                rgb=decoded.rgb,
                original_size=decoded.original_size,
                pixels=pixels,
                features=features,
                result=result,
                reported=reported[-1],
                label=label,
            )
        pooled.append(trust.pooled(features))
        labels.append(label)
    bar.done()
    if not logits:
        raise DatasetError(f"expected decodable images, found none of {len(files)} files")
    return Outputs(
        logits=np.asarray(logits),
        probabilities=np.asarray(reported),
        pooled=np.asarray(pooled),
        labels=np.asarray(labels),
        skipped=skipped,
    )


class Progress:
    """A progress line on stderr for long folders (over 50 files): redrawn on a terminal, every 25 % otherwise."""

    def __init__(self, total: int, *, stream: TextIO | None) -> None:
        self.total, self.count = total, 0
        self.stream = stream if total > 50 else None
        self.tty = bool(stream is not None and stream.isatty())
        self.shown = -1

    def step(self) -> None:
        self.count += 1
        if self.stream is None:
            return
        percent = 100 * self.count // self.total
        if self.tty:
            self.stream.write(f"\r  {self.count}/{self.total} images ({percent} %)")
            self.stream.flush()
        elif percent // 25 > self.shown:
            self.shown = percent // 25
            self.stream.write(f"  {self.count}/{self.total} images ({percent} %)\n")

    def done(self) -> None:
        if self.stream is not None and self.tty:
            self.stream.write("\n")


def stratified_split(labels: np.ndarray, *, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, held-out indices): ``share`` of each class held out (at least one where a class has 5+)."""
    rng = np.random.default_rng(seed)
    fit: list[int] = []
    held: list[int] = []
    for k in np.unique(labels):
        members = [int(i) for i in rng.permutation(np.flatnonzero(labels == k))]
        n_out = round(share * len(members)) if len(members) >= 5 else 0
        held.extend(members[:n_out])
        fit.extend(members[n_out:])
    return np.sort(np.array(fit, dtype=np.int64)), np.sort(np.array(held, dtype=np.int64))


def folder_digest(files: Sequence[tuple[Path, int]], root: Path) -> str:
    """SHA-256 over each file's path under ``root`` and its bytes' SHA-256, in order."""
    outer = hashlib.sha256()
    for path, _ in files:
        outer.update(str(path.relative_to(root)).encode() + b"\0")
        outer.update(hashlib.sha256(path.read_bytes()).digest())
    return outer.hexdigest()


def calibrate(
    bundle_path: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    target_accuracy: float = trust.DEFAULT_TARGET_ACCURACY,
    seed: int = 0,
    progress: TextIO | None = sys.stderr,
) -> dict[str, Any]:
    """Fit the trust signals on a labelled folder and write the calibrated bundle; the report."""
    source = Path(bundle_path)
    loaded = bundle_format.read(source)
    manifest, head = loaded.manifest, loaded.head
    files = labelled_files(data, manifest.labels)
    engine = LiteRTEngine(source, sha256="calibrating")
    engine.calibration = None  # fit on the model's own logits, whatever the bundle had
    try:
        outputs = run_files(engine, files, progress=progress)
    finally:
        engine.close()
    counts = np.bincount(outputs.labels, minlength=len(manifest.labels))
    thin = [manifest.labels[k] for k, n in enumerate(counts) if n < MIN_IMAGES_PER_CLASS]
    if thin:
        raise DatasetError(
            f"expected at least {MIN_IMAGES_PER_CLASS} decodable images for every label, found fewer for {thin}"
        )
    fit, held = stratified_split(outputs.labels, share=HOLDOUT_SHARE, seed=seed)
    output, binary = head.output_activation, head.binary
    temperature = trust.fit_temperature(
        outputs.logits[fit], outputs.labels[fit], output=output, binary=binary
    )

    def probabilities(rows: np.ndarray, t: float) -> np.ndarray:
        return trust.calibrated(outputs.logits[rows], temperature=t, output=output, binary=binary)

    threshold, coverage, accuracy = trust.abstention_threshold(
        probabilities(fit, temperature), outputs.labels[fit], target_accuracy=target_accuracy
    )
    model = trust.DistributionModel.fit(outputs.pooled[fit], outputs.labels[fit])
    model = model.with_threshold(
        trust.cross_fitted_threshold(outputs.pooled[fit], outputs.labels[fit], seed=seed)
    )
    evaluated = held if held.size else fit

    def figures(t: float) -> dict[str, float]:
        p = probabilities(evaluated, t)
        y = outputs.labels[evaluated]
        return {
            "ece": round(trust.ece(p, y), 6),
            "nll": round(trust.nll(p, y), 6),
            "accuracy": round(float(np.mean(p.argmax(axis=1) == y)), 6),
        }

    held_scores = model.scores(outputs.pooled[evaluated])
    section = {
        "method": "temperature scaling (NLL); class-conditional Mahalanobis distance of the pooled feature "
        "map, shared covariance (top principal directions + isotropic residual); abstention on top-1 probability",
        "temperature": round(temperature, 6),
        "confidence": {
            "threshold": round(threshold, 6),
            "target_accuracy": target_accuracy,
            "coverage": round(coverage, 6),
            "accuracy": round(accuracy, 6),
        },
        "distribution": {
            "score": "squared Mahalanobis distance to the nearest class mean, per channel",
            "threshold": round(model.threshold, 6),
            "in_distribution_share": trust.IN_DISTRIBUTION_SHARE,
            "rank": int(model.components.shape[0]),
            "held_out_inside": round(float(np.mean(held_scores <= model.threshold)), 6),
        },
        "data": {
            "images": len(outputs.labels),
            "skipped": outputs.skipped,
            "per_class": {label: int(n) for label, n in zip(manifest.labels, counts, strict=True)},
            "sha256": folder_digest(files, Path(data)),
            "fitted_on": int(fit.size),
            "held_out": int(held.size),
        },
        "evaluation": {
            "on": "held-out" if held.size else "fit (no class had 5 images)",
            "before": figures(1.0),
            "after": figures(temperature),
        },
        "fitted_at": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
    }
    calibration = trust.Calibration(temperature, threshold, model, section)
    bundle_format.copy_with(source, out, calibration=calibration)  # read back, calibration included
    return section


def round4(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 4)


def fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def calibration_table(section: dict[str, Any]) -> str:
    """The table ``calibrate`` prints."""
    evaluation = section["evaluation"]
    before, after = evaluation["before"], evaluation["after"]
    lines = [
        f"| on the {evaluation['on']} images ({section['data']['held_out']}) | before | after (T = {section['temperature']:.3f}) |",
        "|---|---:|---:|",
        *(
            f"| {name.upper() if name != 'accuracy' else name} | {before[name]:.4f} | {after[name]:.4f} |"
            for name in ("ece", "nll", "accuracy")
        ),
        "",
        f"Confidence threshold {section['confidence']['threshold']:.4f} (accepted answers {section['confidence']['accuracy']:.1%} "
        f"correct, coverage {section['confidence']['coverage']:.1%}, target {section['confidence']['target_accuracy']:.0%}); "
        f"distribution threshold {section['distribution']['threshold']:.4f} "
        f"({section['distribution']['held_out_inside']:.1%} of held-out images inside).",
    ]
    return "\n".join(lines)
