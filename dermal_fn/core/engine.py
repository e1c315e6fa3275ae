"""The engine: backbone to feature map, the head to probabilities, its backward pass to Grad-CAM.

Two backends share one interface (:class:`Engine`):

- ``litert`` (:class:`LiteRTEngine`, here): a bundle's backbone in a LiteRT interpreter (XNNPACK) and
  the head in NumPy. No TensorFlow. The interpreter is not thread-safe: one per engine, under a lock.
- ``tensorflow`` (``dermal_fn.keras.reference.KerasEngine``): a Keras file, the reference.

Which one serves a file is decided above both, in :mod:`dermal_fn.serving.engines`. The engine takes
a class *index*; labels are resolved once, by the caller.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from dermal_fn.core import bundle as bundle_format
from dermal_fn.core import imaging
from dermal_fn.core.gradcam import grad_cam
from dermal_fn.core.head import Head, Score
from dermal_fn.core.imaging import InputScale, Normalization
from dermal_fn.core.native_log import native_output_as_records
from dermal_fn.core.trust import Calibration, calibrated, pooled
from dermal_fn.errors import BundleError

logger = logging.getLogger(__name__)

# how a LiteRT engine knew its backbone runs (LiteRTEngine.load_check)
LoadCheck = Literal["zero-image inference", "exporter", "earlier load"]


@dataclass(frozen=True)
class Inference:
    """One model run: probabilities for every class, and the Grad-CAM grid when asked for.

    ``probabilities`` are what the answer reports: temperature-scaled when the bundle is calibrated.
    ``pooled`` is the feature map averaged over space (what the distribution score measures).
    """

    probabilities: np.ndarray
    logits: np.ndarray
    pooled: np.ndarray
    class_index: int
    score: Score
    grid: np.ndarray | None
    model_ms: float
    gradcam_ms: float


@dataclass(frozen=True)
class ModelInfo:
    """What the engine serves: name, labels, preprocessing, Grad-CAM layer."""

    name: str
    sha256: str
    backend: str
    labels: tuple[str, ...]
    layer: str
    input_size: tuple[int, int]
    input_scale: InputScale
    resize: str
    quantization: str
    calibrated: bool = False
    normalization: Normalization = field(default_factory=Normalization)

    def model_input(self, image: Image.Image) -> np.ndarray:
        """The model's input for a decoded photo: resized, scaled and normalised as the bundle says."""
        return imaging.model_input(
            image,
            size=self.input_size,
            scale=self.input_scale,
            resize=self.resize,
            normalization=self.normalization,
        )


class Engine:
    """Backbone + head. Subclasses provide :meth:`feature_map` (and may override :meth:`run`)."""

    info: ModelInfo
    head: Head
    calibration: Calibration | None = None
    load_check: LoadCheck | None = None  # how a bundle was known to run (None: not a bundle)

    def feature_map(self, pixels: np.ndarray) -> np.ndarray:
        """The Grad-CAM layer's output for one preprocessed input: (1, h, w, c)."""
        raise NotImplementedError

    def resolve_class(self, class_index: int | None, probabilities: np.ndarray) -> int:
        """The class to explain: ``class_index``, or the most probable when None."""
        if class_index is None:
            return int(np.argmax(probabilities))
        if not 0 <= class_index < len(self.info.labels):
            raise ValueError(f"expected a class index 0..{len(self.info.labels) - 1}, found {class_index}")
        return int(class_index)

    def run(
        self,
        pixels: np.ndarray,
        *,
        class_index: int | None = None,
        score: Score = "logit",
        gradcam: bool = True,
    ) -> Inference:
        """Probabilities and (optionally) the Grad-CAM grid for one preprocessed input."""
        started = time.perf_counter()
        features = self.feature_map(pixels)
        result = self.head.forward(features)
        probabilities = self.reported(result.logits, result.probabilities)
        target = self.resolve_class(class_index, probabilities)
        model_done = time.perf_counter()
        grid = None
        if gradcam:
            gradient = self.head.backward(
                result, self.head.score_gradient(result, class_index=target, score=score)
            )
            grid = grad_cam(features, gradient)
        done = time.perf_counter()
        return Inference(
            probabilities=probabilities,
            logits=np.asarray(result.logits, dtype=np.float64),
            pooled=pooled(features),
            class_index=target,
            score=score,
            grid=grid,
            model_ms=(model_done - started) * 1e3,
            gradcam_ms=(done - model_done) * 1e3 if gradcam else 0.0,
        )

    def reported(self, logits: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
        """What the answer reports: the model's probabilities, temperature-scaled when calibrated."""
        if self.calibration is None:
            return np.asarray(probabilities, dtype=np.float64)
        return calibrated(
            logits,
            temperature=self.calibration.temperature,
            output=self.head.output_activation,
            binary=self.head.binary,
        )

    def close(self) -> None:
        """Release what the engine holds."""


class LiteRTEngine(Engine):
    """A bundle served with LiteRT (backbone) and NumPy (head).

    Before it counts as loaded: the manifest and head are validated (``bundle.read``), the backbone's
    bytes are checked against the manifest's CRC-32, and the backbone must be known to run: either
    one inference on a zero image gives a finite feature map that the head turns into
    probabilities, or that is already proven and not repeated (it costs a whole inference, a
    fifth of a cold start's CPU): the CRC-32 matched and the exporter verified these bytes on this
    same runtime (``verification.runtime`` in the manifest), or the caller says these bytes loaded
    and ran here before (``known_good``). ``load_check`` says which.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        sha256: str,
        num_threads: int = 1,
        weight_cache_dir: Path | None = None,
        known_good: bool = False,
    ) -> None:
        """``known_good``: these bytes loaded and ran on this runtime before; skips the CRC-32 read and the check inference."""
        loaded = bundle_format.read(path)
        manifest = loaded.manifest
        self.load_check = "earlier load"
        if not known_good:
            bundle_format.verify_backbone(path, manifest)
            self.load_check = "exporter" if exporter_verified_here(manifest) else "zero-image inference"
        self.head = loaded.head
        self.calibration = loaded.calibration
        self.manifest = manifest
        self.info = ModelInfo(
            name=manifest.name,
            sha256=sha256,
            backend="litert",
            labels=manifest.labels,
            layer=manifest.layer,
            input_size=manifest.input_size,
            input_scale=manifest.input_scale,
            resize=manifest.resize,
            quantization=manifest.quantization,
            calibrated=loaded.calibration is not None,
            normalization=manifest.normalization,
        )
        self.num_threads = num_threads
        self._lock = threading.Lock()
        self.weight_cache = (
            None
            if weight_cache_dir is None
            else xnnpack_weight_cache_path(path, sha256=sha256, folder=weight_cache_dir)
        )
        self._model: Any = None
        self._inputs: list[Any] = []
        self._outputs: list[Any] = []
        # LiteRT prints its own lines on fd 2 as it creates and destroys environments: re-emitted as
        # our records, and a load that fails drops what it made inside the capture too
        with native_output_as_records(logger):
            try:
                self._open(path, manifest)
            except BaseException:
                self._drop()
                raise
        if weight_cache_dir is not None and self.weight_cache is not None:
            prune_weight_caches(weight_cache_dir, keep=self.weight_cache)

    def _open(self, path: str | Path, manifest: bundle_format.Manifest) -> None:
        """The LiteRT model, its buffers, and (when not proven) the check inference."""
        try:
            self._model = _compiled_model(path, num_threads=self.num_threads, weight_cache=self.weight_cache)
            (signature,) = self._model.get_signature_list()
            (inp,) = self._model.get_input_tensor_details(signature).values()
            (out,) = self._model.get_output_tensor_details(signature).values()
            self._inputs = self._model.create_input_buffers(0)
            self._outputs = self._model.create_output_buffers(0)
        except (ValueError, RuntimeError) as exc:
            raise BundleError(f"expected a LiteRT backbone the runtime can load, found: {exc}") from exc
        h, w = manifest.input_size
        if tuple(inp["shape"]) != (1, h, w, 3):
            raise BundleError(f"expected backbone input (1, {h}, {w}, 3), found {tuple(inp['shape'])}")
        if tuple(out["shape"][1:]) != manifest.feature_map_shape:
            raise BundleError(
                f"expected backbone output {manifest.feature_map_shape}, found {tuple(out['shape'][1:])}"
            )
        self._output_shape = tuple(int(d) for d in out["shape"])
        self._output_size = int(np.prod(self._output_shape))
        # LiteRT makes one more environment (and prints its native lines) on a buffer's first write:
        # here, inside the load and its capture, not in the first request
        self._inputs[0].write(np.zeros((1, h, w, 3), dtype=np.float32))
        if self.load_check == "zero-image inference":
            self._smoke_test(h, w)

    def _smoke_test(self, height: int, width: int) -> None:
        """One inference on a zero image: a finite feature map, and probabilities from the head."""
        try:
            features = self.feature_map(np.zeros((1, height, width, 3), dtype=np.float32))
        except (ValueError, RuntimeError) as exc:
            raise BundleError(f"expected the backbone to run on a zero image, found: {exc}") from exc
        if not np.all(np.isfinite(features)):
            raise BundleError("expected a finite feature map for a zero image, found NaN or infinity")
        probabilities = self.head.forward(features).probabilities
        if not np.all(np.isfinite(probabilities)):
            raise BundleError("expected finite probabilities for a zero image, found NaN or infinity")

    def feature_map(self, pixels: np.ndarray) -> np.ndarray:
        with self._lock:
            self._inputs[0].write(np.ascontiguousarray(pixels, dtype=np.float32))
            self._model.run_by_index(0, self._inputs, self._outputs)
            return self._outputs[0].read(self._output_size, np.float32).reshape(self._output_shape)

    def close(self) -> None:
        """Drop the model and buffers; LiteRT's lines as it destroys the model's environment are records."""
        with self._lock, native_output_as_records(logger):
            self._drop()

    def _drop(self) -> None:
        """Let go of the LiteRT objects (the caller captures what LiteRT prints as they go)."""
        self._inputs, self._outputs = [], []
        self._model = None


def exporter_verified_here(manifest: bundle_format.Manifest) -> bool:
    """True when the manifest proves the backbone runs here: its CRC-32 is recorded (and was checked)
    and the exporter verified the bundle against Keras on this same LiteRT runtime."""
    verification = manifest.extra.get("verification")
    return (
        manifest.backbone_crc32 is not None
        and isinstance(verification, dict)
        and verification.get("runtime") == litert_runtime()
    )


@functools.cache
def litert_version() -> str:
    """The installed ai-edge-litert's version ("unknown" when it is not installed as a package)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ai-edge-litert")
    except PackageNotFoundError:
        return "unknown"


def litert_runtime() -> str:
    """The runtime as bundles and markers record it: ``ai-edge-litert 2.3.0``."""
    return f"ai-edge-litert {litert_version()}"


WEIGHT_CACHE_SUFFIX = ".xnnpack"
# only the model in use: on Cloud Functions and Cloud Run the cache folder is in memory, and an older
# generation's packed weights cost as much of the container's memory as the model's own
WEIGHT_CACHES_KEPT = 1


def xnnpack_weight_cache_path(path: str | Path, *, sha256: str, folder: Path) -> Path:
    """Where XNNPACK keeps this bundle's packed weights: a file in ``folder``, per model, runtime and CPU.

    With the cache the packed weights are a mapped file (shared, reclaimable page cache) instead of
    a private copy next to the mapped model: measured on EfficientNetV2-S @384 fp32, RSS after the
    first inference 173 MB instead of 240 MB, and a restart loads in 0.08 s instead of 0.5 s.
    ``folder`` should be private (the service puts it in its 0700 cache folder): a planted cache
    file would be mapped as weights.

    The key is the model's content (SHA-256 and size), the runtime and the CPU (:func:`cpu_identity`),
    not the file's inode or mtime: a cache built at deploy time (``python -m dermal_fn.serving.warm``)
    is found again after the platform copies the build into the container. XNNPACK checks only its
    own build identifier when it maps a cache, and its packed layouts depend on the microkernels it
    picked for the CPU, so a cache built on another CPU is never used: it gets a key of its own.
    """
    import hashlib

    size = Path(path).stat().st_size
    key = f"{sha256}|{size}|{litert_version()}|{cpu_identity()}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return folder / f"{digest}{WEIGHT_CACHE_SUFFIX}"


# the /proc/cpuinfo fields that decide which kernels XNNPACK picks: the vendor, model and instruction
# set extensions (x86), the implementer, part and features (Arm). Not the clock, cache sizes or core ids.
_CPU_FIELDS = frozenset(
    {
        "vendor_id",
        "cpu family",
        "model",
        "flags",
        "CPU implementer",
        "CPU architecture",
        "CPU variant",
        "CPU part",
        "Features",
    }
)


@functools.cache
def cpu_identity(cpuinfo: str = "/proc/cpuinfo") -> str:
    """A short digest of what this CPU can run, from the first processor in ``/proc/cpuinfo``
    (the machine name alone where that file cannot be read)."""
    import hashlib
    import platform

    fields = [platform.machine()]
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as file:
            for line in file:
                if not line.strip():
                    if len(fields) > 1:
                        break  # the first processor's block is enough
                    continue
                name, _, value = line.partition(":")
                if name.strip() in _CPU_FIELDS:
                    fields.append(f"{name.strip()}={' '.join(sorted(value.split()))}")
    except OSError:
        pass
    return hashlib.sha256("\n".join(fields).encode()).hexdigest()[:16]


def prune_weight_caches(folder: Path, *, keep: Path, count: int = WEIGHT_CACHES_KEPT) -> list[str]:
    """Delete all but the ``count`` most recently used weight caches in ``folder`` (``keep`` always stays)."""
    with contextlib.suppress(OSError):
        os.utime(keep)
    caches = []
    for entry in folder.glob(f"*{WEIGHT_CACHE_SUFFIX}"):
        with contextlib.suppress(OSError):
            caches.append((entry.stat().st_mtime, entry))
    removed = []
    for _, entry in sorted(caches, reverse=True)[count:]:
        if entry != keep:
            with contextlib.suppress(OSError):
                entry.unlink()
                removed.append(entry.name)
    return removed


def _compiled_model(path: str | Path, *, num_threads: int, weight_cache: Path | None) -> Any:
    """A LiteRT CompiledModel on the CPU (XNNPACK), its packed weights in ``weight_cache``.

    XNNPACK writes the cache file while it builds; it is built under a name of this process and
    renamed into place afterwards, so a concurrent start never maps a half-written cache.
    """
    from ai_edge_litert.compiled_model import CompiledModel
    from ai_edge_litert.cpu_options import CpuOptions
    from ai_edge_litert.options import Options

    def load(cache: Path | None) -> Any:
        options = Options(
            cpu_options=CpuOptions(num_threads=num_threads, xnnpack_weight_cache_path=str(cache or ""))
        )
        return CompiledModel.from_file(str(path), options=options)

    if weight_cache is None:
        return load(None)
    if weight_cache.exists():
        return load(weight_cache)
    try:
        weight_cache.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        return load(None)
    building = weight_cache.with_name(f"{weight_cache.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        model = load(building)
        if building.exists() and building.stat().st_size > 0:
            os.replace(building, weight_cache)
    finally:
        with contextlib.suppress(OSError):
            building.unlink()
    return model
