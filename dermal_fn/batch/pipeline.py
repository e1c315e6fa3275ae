"""``dermal-fn batch``: score a folder, a glob, a ``gs://`` prefix or a CSV of paths on Apache Beam.

    dermal-fn batch --model URI --input SRC --output PREFIX [--heatmaps DIR] [--top-k K] [--no-gradcam]
                    [Beam pipeline options: --runner DataflowRunner --project … --region … --temp_location gs://…]

Writes ``PREFIX-00000-of-0000N.jsonl``: one row per input file, ``{"image": path, ...the /predict
body...}`` or ``{"image": path, "error": {"code", "message"}}`` (a file that cannot be read or
decoded is an error row, never a failed pipeline). A CSV's optional ``label`` column is kept in the
rows, so ``dermal-fn evaluate BUNDLE --rows 'PREFIX-*.jsonl'`` measures a large evaluation. Without
``--runner`` the pipeline runs in this process on Beam's FnApiRunner (offline; the default local
runner would download its Prism binary).
"""

from __future__ import annotations

import base64
import csv
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import RunInference
from apache_beam.options.pipeline_options import PipelineOptions

from dermal_fn.batch import handler as handler_module
from dermal_fn.batch.handler import NAMESPACE, BundleModelHandler, Row, error_row
from dermal_fn.errors import DermalError, InvalidImage
from model_fetch.errors import FetchError, ModelTooLarge
from model_fetch.objects import list_files, read_file

logger = logging.getLogger(__name__)

MAX_FILE_BYTES = 50 * 1024 * 1024  # a photo larger than this is an error row, not read


@dataclass(frozen=True)
class Source:
    """One input file, and its label when a CSV gave one."""

    path: str
    label: str | None = None


@dataclass(frozen=True)
class Summary:
    """What a run did: rows written, error rows among them, images per second, model loads."""

    rows: int
    errors: int
    seconds: float
    model_loads: int
    outputs: list[str]

    @property
    def images_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "errors": self.errors,
            "seconds": round(self.seconds, 2),
            "images_per_s": round(self.images_per_s, 2),
            "model_loads": self.model_loads,
            "outputs": self.outputs,
        }


def sources(src: str) -> list[Source]:
    """The files ``src`` names: a CSV of paths (``path``/``image`` column, optional ``label``), else
    a folder, glob or ``gs://`` prefix or glob."""
    if src.lower().endswith(".csv"):
        return _csv_sources(src)
    return [Source(path) for path in list_files(src)]


def _csv_sources(src: str) -> list[Source]:
    text = read_file(src, max_bytes=MAX_FILE_BYTES).decode("utf-8-sig")
    rows = list(csv.reader(text.splitlines()))
    if not rows:
        return []
    header = [cell.strip().lower() for cell in rows[0]]
    has_header = "path" in header or "image" in header
    path_at = header.index("path") if "path" in header else header.index("image") if "image" in header else 0
    label_at = (
        header.index("label") if "label" in header else (1 if not has_header and len(rows[0]) > 1 else None)
    )
    base = "" if src.startswith("gs://") else os.path.dirname(os.path.abspath(src))
    out = []
    for row in rows[1:] if has_header else rows:
        if not row or not row[path_at].strip():
            continue
        path = row[path_at].strip()
        if base and not path.startswith("gs://") and not os.path.isabs(path):
            path = os.path.join(base, path)
        label = row[label_at].strip() if label_at is not None and label_at < len(row) else None
        out.append(Source(path, label or None))
    return out


class ReadPhoto(beam.DoFn):
    """A source's bytes, as ``(path, bytes)``; a file that cannot be read goes out tagged ``errors``."""

    def process(self, source: Source) -> Iterator[Any]:
        try:
            data = read_file(source.path, max_bytes=MAX_FILE_BYTES)
        except ModelTooLarge:
            yield beam.pvalue.TaggedOutput(
                "errors",
                error_row(
                    source.path,
                    InvalidImage(f"expected a photo of at most {MAX_FILE_BYTES} bytes, found more"),
                ),
            )
            return
        except (FetchError, OSError) as exc:
            yield beam.pvalue.TaggedOutput(
                "errors", error_row(source.path, InvalidImage(f"expected a readable file, found: {exc}"))
            )
            return
        yield source.path, data


class WriteHeatmap(beam.DoFn):
    """Write a row's overlay PNG to ``folder`` (local or, with apache-beam[gcp], gs://) and keep its path."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def process(self, row: Row) -> Iterator[Row]:
        gradcam = row.get("gradcam") or {}
        picture = gradcam.pop("overlay_png", None) if isinstance(gradcam, dict) else None
        if picture:
            name = os.path.basename(str(row["image"]).rstrip("/")) or "photo"
            target = FileSystems.join(
                self.folder, f"{Path(name).stem}.{abs(hash(row['image'])) % 10**8:08d}.png"
            )
            with FileSystems.create(target) as out:
                out.write(base64.b64decode(picture))
            gradcam["overlay_file"] = target
        yield row


def run(
    model: str,
    src: str,
    output: str,
    *,
    heatmaps: str | None = None,
    top_k: int | None = None,
    gradcam: bool = True,
    beam_args: Sequence[str] = (),
    threads: int = 1,
) -> Summary:
    """Build and run the pipeline; the summary (also logged)."""
    found = sources(src)
    if not found:
        raise DermalError(f"expected photos in {src}, found none")
    labels = {s.path: s.label for s in found if s.label is not None}
    options = PipelineOptions(list(beam_args))
    runner = None
    if not any(arg.startswith("--runner") for arg in beam_args):
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        runner = FnApiRunner()  # in this process, offline
    if heatmaps and not heatmaps.startswith("gs://"):
        os.makedirs(heatmaps, exist_ok=True)
    handler = BundleModelHandler(
        model, top_k=top_k, gradcam=gradcam, overlay="png" if heatmaps else "none", threads=threads
    )
    started = time.perf_counter()
    loads_before = handler_module.LOADS[0]
    pipeline = beam.Pipeline(runner=runner, options=options)
    read = (
        pipeline
        | "Sources" >> beam.Create(found, reshuffle=False)
        | "Reshuffle" >> beam.Reshuffle()
        | "Read" >> beam.ParDo(ReadPhoto()).with_outputs("errors", main="photos")
    )
    answered = (
        read.photos
        | "Score" >> RunInference(handler)
        | "Rows"
        >> beam.MapTuple(lambda image, row: {**row, **({"label": labels[image]} if image in labels else {})})
    )
    if heatmaps:
        answered = answered | "Heatmaps" >> beam.ParDo(WriteHeatmap(heatmaps))
    unread = read.errors | "Label errors" >> beam.Map(
        lambda row: {**row, **({"label": labels[row["image"]]} if row["image"] in labels else {})}
    )
    (
        (answered, unread)
        | "All rows" >> beam.Flatten()
        | "JSON" >> beam.Map(lambda row: json.dumps(row, allow_nan=False))
        | "Write" >> beam.io.WriteToText(output, file_name_suffix=".jsonl")
    )
    result = pipeline.run()
    result.wait_until_finish()
    seconds = time.perf_counter() - started
    counters = {
        c.key.metric.name: c.committed
        for c in result.metrics().query(beam.metrics.MetricsFilter().with_namespace(NAMESPACE))["counters"]
    }
    outputs = sorted(m.path for m in FileSystems.match([f"{output}-*.jsonl"])[0].metadata_list)
    summary = Summary(
        rows=len(found),
        errors=int(counters.get("errors", 0))
        + (len(found) - int(counters.get("rows", 0)) - int(counters.get("errors", 0))),
        seconds=seconds,
        model_loads=handler_module.LOADS[0] - loads_before
        if runner is not None
        else int(counters.get("model_loads", 0)),
        outputs=outputs,
    )
    logger.info("batch done: %s", json.dumps(summary.as_json()))
    return summary
