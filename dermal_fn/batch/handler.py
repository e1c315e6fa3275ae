"""A RunInference model handler for bundles: the function's answer for each photo, in a Beam worker.

The model is loaded once per worker process (RunInference shares it between the process's threads)
as a :class:`~dermal_fn.serving.service.Service`, so a row is exactly the body ``POST /predict``
returns, decoding, model, Grad-CAM and assessment included, or the error it would answer.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Sequence
from typing import Any

from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler

from dermal_fn.errors import DermalError
from dermal_fn.serving.config import Settings
from dermal_fn.serving.error_codes import status_for
from dermal_fn.serving.options import PredictOptions
from dermal_fn.serving.service import Service

Element = tuple[str, bytes]  # (the photo's path or URI, its bytes)
Row = dict[str, Any]
NAMESPACE = "dermal_fn"
# model loads in this process (what the in-process runner's summary reports; Beam's counter on Dataflow)
LOADS = [0]


def error_row(image: str, exc: DermalError) -> Row:
    """A row for a photo that could not be answered: the code and message the HTTP API would give."""
    return {"image": image, "error": {"code": status_for(exc)[1], "message": str(exc)}}


class BundleModelHandler(ModelHandler[Element, tuple[str, Row], Service]):
    """Loads ``model_uri`` once per worker; answers each (path, bytes) with the body of ``POST /predict``."""

    def __init__(
        self,
        model_uri: str,
        *,
        top_k: int | None = None,
        gradcam: bool = True,
        overlay: str = "none",
        threads: int = 1,
        max_batch_size: int = 16,
    ) -> None:
        super().__init__()
        self.model_uri = model_uri
        self.top_k = top_k  # None: every class (what evaluate needs from labelled rows)
        self.gradcam = gradcam
        self.overlay = overlay
        self.threads = threads
        self.max_batch_size = max_batch_size
        self._loads = Metrics.counter(NAMESPACE, "model_loads")
        self._rows = Metrics.counter(NAMESPACE, "rows")
        self._errors = Metrics.counter(NAMESPACE, "errors")

    def load_model(self) -> Service:
        settings = dataclasses.replace(
            Settings.from_env({}),
            model_uri=self.model_uri,
            litert_threads=self.threads,
            memory_limit_mb=None,
            memory_soft_limit_mb=None,
        )
        service = Service(settings)
        service.holder.get(wait_s=600.0)
        LOADS[0] += 1
        self._loads.inc()
        return service

    def run_inference(
        self, batch: Sequence[Element], model: Service, inference_args: dict[str, Any] | None = None
    ) -> Iterable[tuple[str, Row]]:
        engine = model.holder.get()
        n_labels = len(engine.info.labels)
        options = PredictOptions(
            top_k=n_labels if self.top_k is None else max(1, min(self.top_k, n_labels)),
            gradcam=self.gradcam,
            overlay=self.overlay,  # type: ignore[arg-type]
        )
        out = []
        for image, data in batch:
            try:
                body = model.predict(data, options).body
            except DermalError as exc:
                self._errors.inc()
                out.append((image, error_row(image, exc)))
                continue
            self._rows.inc()
            out.append((image, {"image": image, **body}))
        return out

    def batch_elements_kwargs(self) -> dict[str, int]:
        return {"min_batch_size": 1, "max_batch_size": self.max_batch_size}

    def get_metrics_namespace(self) -> str:
        return NAMESPACE


def elapsed_since(started: float) -> float:
    """Seconds since ``started`` (``time.perf_counter``)."""
    return time.perf_counter() - started
