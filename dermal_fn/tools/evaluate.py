"""``evaluate``: measure a bundle's figures and audit it, on a labelled folder or on batch rows.

    dermal-fn evaluate BUNDLE --data DIR [--ood DIR] [--json OUT] [--html OUT] [--write OUT]
    dermal-fn evaluate BUNDLE --rows 'PREFIX-*.jsonl'

Balanced accuracy, per-class recall and AUROC, ECE, NLL, coverage at the abstention threshold; with
``--ood`` the distribution score's AUROC; the explanation and skin-tone audit
(:mod:`dermal_fn.tools.audit`) and its HTML page. No TensorFlow: the LiteRT engine runs each photo
as the server decodes it.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from dermal_fn.core import bundle as bundle_format
from dermal_fn.core import trust
from dermal_fn.core.engine import LiteRTEngine
from dermal_fn.errors import DatasetError
from dermal_fn.tools.folders import image_files, labelled_files
from dermal_fn.tools.trust import fmt, round4, run_files


def evaluate(
    bundle_path: str | Path,
    data: str | Path,
    *,
    ood: str | Path | None = None,
    progress: TextIO | None = sys.stderr,
    audit_images: int = 50,
    html: str | Path | None = None,
) -> dict[str, Any]:
    """Balanced accuracy, per-class recall and AUROC, ECE, NLL, coverage; with ``ood``, the distribution AUROC;
    the audit (``explanations`` on ``audit_images`` photos, ``skin_tone`` on all); with ``html``, the report."""
    from dermal_fn.tools.audit import Auditor

    path = Path(bundle_path)
    engine = LiteRTEngine(path, sha256="evaluating")
    labels = engine.info.labels
    auditor = Auditor(engine, images=audit_images)
    try:
        outputs = run_files(engine, labelled_files(data, labels), progress=progress, visit=auditor.visit)
        outside = (
            run_files(engine, [(f, -1) for f in image_files(ood, option="--ood")], progress=progress)
            if ood
            else None
        )
    finally:
        engine.close()
    p, y = outputs.probabilities, outputs.labels
    calibration = engine.calibration
    threshold = calibration.confidence_threshold if calibration is not None else trust.UNCALIBRATED_CONFIDENCE
    report: dict[str, Any] = {
        "bundle": path.name,
        "calibrated": calibration is not None,
        "skipped": outputs.skipped,
        **classification_figures(p, y, labels, threshold=threshold, auroc=True),
    }
    model = calibration.distribution if calibration is not None else None
    if model is not None:
        inside = model.scores(outputs.pooled)
        report["flagged_out"] = {"data": round4(float(np.mean(inside > model.threshold)))}
        if outside is not None:
            scores = model.scores(outside.pooled)
            report["ood"] = {
                "images": len(scores),
                "distribution_auroc": round4(trust.auroc(scores, inside)),
                "flagged_out": round4(float(np.mean(scores > model.threshold))),
                "confident": round4(float(np.mean(outside.probabilities.max(axis=1) >= threshold))),
            }
    elif outside is not None:
        report["ood"] = {
            "images": len(outside.labels),
            "distribution_auroc": None,
            "note": "uncalibrated bundle",
        }
    report["explanations"] = auditor.explanations()
    flagged = model.scores(outputs.pooled) > model.threshold if model is not None else None
    report["skin_tone"] = auditor.skin_tone(p, y, threshold=threshold, flagged_out=flagged)
    if html is not None:
        from dermal_fn.tools.report_html import write_report

        head = engine.head
        before = trust.calibrated(
            outputs.logits, temperature=1.0, output=head.output_activation, binary=head.binary
        )
        write_report(
            Path(html),
            report,
            labels=labels,
            truth=y,
            before=before,
            after=p,
            inside_scores=model.scores(outputs.pooled) if model is not None else None,
            outside_scores=model.scores(outside.pooled)
            if model is not None and outside is not None
            else None,
            distribution_threshold=model.threshold if model is not None else None,
            errors=auditor.errors(),
        )
    return report


def classification_figures(
    p: np.ndarray, y: np.ndarray, labels: Sequence[str], *, threshold: float, auroc: bool = False
) -> dict[str, Any]:
    """Images, balanced accuracy, accuracy, ECE, NLL, coverage at ``threshold``, per-class recall (and AUROC)."""
    per_class_recall = trust.recalls(p, y, len(labels))
    per_class_auroc = trust.one_vs_rest_auroc(p, y, len(labels)) if auroc else None
    accepted = p.max(axis=1) >= threshold
    correct = p.argmax(axis=1) == y
    return {
        "images": len(y),
        "balanced_accuracy": round4(float(np.nanmean(per_class_recall))),
        "accuracy": round4(float(np.mean(correct))),
        "ece": round4(trust.ece(p, y)),
        "nll": round4(trust.nll(p, y)),
        "confidence_threshold": round4(threshold),
        "coverage": round4(float(np.mean(accepted))),
        "accuracy_when_confident": round4(float(np.mean(correct[accepted]))) if accepted.any() else None,
        "per_class": [
            {
                "label": label,
                "images": int(np.sum(y == k)),
                "recall": round4(per_class_recall[k]),
                "auroc": round4(per_class_auroc[k]) if per_class_auroc is not None else None,
            }
            for k, label in enumerate(labels)
        ],
    }


def evaluate_rows(bundle_path: str | Path, pattern: str) -> dict[str, Any]:
    """The classification figures of ``evaluate`` from ``dermal-fn batch`` rows that carry a ``label``
    (a CSV's label column) and every class's probability (the batch default): a large evaluation is
    Beam, then this. The audit needs the photos themselves: run ``evaluate --data`` on a sample."""
    import glob

    engine = LiteRTEngine(Path(bundle_path), sha256="evaluating")
    labels = engine.info.labels
    calibration = engine.calibration
    engine.close()
    probabilities, truth, flagged, errors, unlabelled = [], [], [], 0, 0
    files = sorted(glob.glob(pattern))
    if not files:
        raise DatasetError(f"expected batch rows at {pattern}, found no file")
    for file in files:
        for line in Path(file).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if "error" in row:
                errors += 1
                continue
            if row.get("label") not in labels:
                unlabelled += 1
                continue
            p = np.zeros(len(labels))
            for prediction in row["predictions"]:
                p[prediction["index"]] = prediction["probability"]
            if len(row["predictions"]) < len(labels):
                raise DatasetError(
                    f"expected every class's probability in the rows, found {len(row['predictions'])} of "
                    f"{len(labels)}: run batch without --top-k"
                )
            probabilities.append(p)
            truth.append(labels.index(row["label"]))
            flagged.append(row.get("assessment", {}).get("distribution", {}).get("status") == "out")
    if not truth:
        raise DatasetError(
            f"expected rows with a label among {list(labels)}, found none in {len(files)} file(s)"
        )
    threshold = calibration.confidence_threshold if calibration is not None else trust.UNCALIBRATED_CONFIDENCE
    return {
        "bundle": Path(bundle_path).name,
        "source": f"batch rows ({len(files)} file(s))",
        "calibrated": calibration is not None,
        "error_rows": errors,
        "unlabelled_rows": unlabelled,
        "skipped": errors,
        **classification_figures(np.asarray(probabilities), np.asarray(truth), labels, threshold=threshold),
        "flagged_out": {"data": round4(float(np.mean(flagged)))},
    }


def write_audit(bundle_path: str | Path, out: str | Path, report: dict[str, Any]) -> Path:
    """A copy of the bundle whose manifest carries the audit (``GET /model`` shows it as ``audit``)."""
    explanations = {k: v for k, v in report["explanations"].items() if k != "curves"}
    section = {
        "evaluated_at": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "images": report["images"],
        "balanced_accuracy": report["balanced_accuracy"],
        "ece": report["ece"],
        "explanations": explanations,
        "skin_tone": report["skin_tone"],
    }
    return bundle_format.copy_with(bundle_path, out, extra={"audit": section}).path


def evaluation_table(report: dict[str, Any]) -> str:
    """The Markdown ``evaluate`` prints."""
    rows = [
        ("images", report["images"]),
        ("balanced accuracy (mean recall)", report["balanced_accuracy"]),
        ("accuracy", report["accuracy"]),
        ("ECE (15 bins)", report["ece"]),
        ("NLL", report["nll"]),
        ("confidence threshold", report["confidence_threshold"]),
        ("coverage at the threshold", report["coverage"]),
        ("accuracy when confident", report["accuracy_when_confident"]),
    ]
    if "flagged_out" in report:
        rows.append(("--data flagged out of distribution", report["flagged_out"]["data"]))
    if "ood" in report:
        rows.append(("--ood images", report["ood"]["images"]))
        rows.append(("distribution AUROC (--ood vs --data)", report["ood"].get("distribution_auroc")))
        if "flagged_out" in report["ood"]:
            rows.append(("--ood flagged out of distribution", report["ood"]["flagged_out"]))
            rows.append(("--ood answered confidently", report["ood"]["confident"]))
    lines = [
        f"{report['bundle']} ({'calibrated' if report['calibrated'] else 'not calibrated'})",
        "",
        "| metric | value |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {fmt(value)} |" for name, value in rows]
    lines += ["", "| class | images | recall | AUROC (one vs rest) |", "|---|---:|---:|---:|"]
    lines += [
        f"| {c['label']} | {c['images']} | {fmt(c['recall'])} | {fmt(c['auroc'])} |"
        for c in report["per_class"]
    ]
    return "\n".join(lines)
