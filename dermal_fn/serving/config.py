"""Configuration: read from the environment in one place, into a frozen dataclass, validated at cold start.

Each setting is written once, as a field of :class:`Settings` with its variable, parser, default and
meaning (``setting(...)``); ``Settings.from_env`` walks that table, and README's configuration table
is :func:`markdown_table` (a test keeps the two equal). Three defaults come from the container at
cold start: the memory limit (cgroup), the soft limit (90 % of it) and the interpreter threads (the
CPU quota).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dermal_fn.errors import ConfigError
from dermal_fn.models import DEMO_BUNDLE
from dermal_fn.serving.memory import available_cpus, cgroup_memory_limit_mb
from model_fetch.digest import normalize_sha256

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
SOFT_LIMIT_SHARE = 0.9


def parse_bool(value: str | bool, *, name: str) -> bool:
    """``true/false/1/0/yes/no/on/off`` (any case) as a bool."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"expected {name} to be true or false, found {value!r}")


# --- parsers: (variable name, stripped non-empty text) -> value --------------------------------------

Parser = Callable[[str, str], Any]


def _text(name: str, raw: str) -> str:
    return raw


def _flag(name: str, raw: str) -> bool:
    return parse_bool(raw, name=name)


def _sha256(name: str, raw: str) -> str | None:
    try:
        return normalize_sha256(raw)
    except ValueError:
        raise ConfigError(f"expected {name} to be 64 hex digits, found {raw!r}") from None


def _number(minimum: float) -> Parser:
    def parse(name: str, raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"expected {name} to be a number, found {raw!r}") from None
        if not math.isfinite(value) or value < minimum:
            raise ConfigError(f"expected {name} to be a number >= {minimum:g}, found {raw!r}")
        return value

    return parse


def _whole(minimum: int) -> Parser:
    def parse(name: str, raw: str) -> int:
        if not (raw.isascii() and raw.isdigit()) or int(raw) < minimum:
            raise ConfigError(f"expected {name} to be a whole number >= {minimum}, found {raw!r}")
        return int(raw)

    return parse


def _origins(name: str, raw: str) -> tuple[str, ...]:
    return tuple(o.strip() for o in raw.split(",") if o.strip())


def setting(env: str, default: Any, parse: Parser, doc: str, *, shown: str | None = None) -> Any:
    """A field of :class:`Settings`: its variable, default, parser, meaning, and the default as README shows it."""
    if shown is None:
        text = f"{default:g}" if isinstance(default, float) else str(default).lower()
        shown = "–" if default in (None, ()) else f"`{text}`"
    return field(default=default, metadata={"env": env, "parse": parse, "doc": doc, "shown": shown})


@dataclass(frozen=True)
class Settings:
    """Everything the service reads from its environment."""

    model_uri: str = setting(
        "MODEL_URI",
        str(DEMO_BUNDLE),
        _text,
        "`gs://bucket/object`, `https://…` (or `http://…` with `MODEL_SHA256`), a local bundle, or a Keras file"
        " (`.keras`, `.h5`, SavedModel: TensorFlow backend); a URL's query string never appears in logs or answers",
        shown="the bundled demo",
    )
    model_sha256: str | None = setting("MODEL_SHA256", None, _sha256, "refuse a model whose SHA-256 differs")
    model_cache_dir: str | None = setting(
        "MODEL_CACHE_DIR",
        None,
        _text,
        "where a downloaded bundle is kept (reused for the same object generation, or without asking"
        " storage when its bytes are the `MODEL_SHA256` pin), with the digest memo, the verified marker"
        " and XNNPACK's packed weights; render.yaml sets `.model-cache`, which its build warms",
        shown="a temp dir",
    )
    allow_demo_model: bool = setting(
        "ALLOW_DEMO_MODEL",
        False,
        _flag,
        "on a platform (`RENDER` or `K_SERVICE` set), an empty `MODEL_URI` serves the synthetic demo only when `true`",
    )
    enable_gradcam: bool = setting(
        "ENABLE_GRADCAM", True, _flag, 'heatmaps on or off (`"gradcam": {"status": "disabled"}`)'
    )
    memory_limit_mb: float | None = setting(
        "MEMORY_LIMIT_MB",
        None,
        _number(1.0),
        "the container's memory limit (MiB), when the cgroup does not say",
        shown="the cgroup's limit",
    )
    memory_soft_limit_mb: float | None = setting(
        "MEMORY_SOFT_LIMIT_MB",
        None,
        _number(0.0),
        'above it heatmaps are skipped (`"status": "skipped", "reason": "memory_pressure"`)',
        shown="90 % of the limit",
    )
    max_upload_mb: float = setting(
        "MAX_UPLOAD_MB",
        10.0,
        _number(0.001),
        "larger bodies get 413, from `Content-Length` or while streaming",
    )
    max_image_megapixels: float = setting(
        "MAX_IMAGE_MEGAPIXELS",
        24.0,
        _number(0.001),
        "larger images are refused from their header (JPEGs, decoded reduced, may declare 4 × as many)",
    )
    max_decode_mb: float = setting(
        "MAX_DECODE_MB",
        100.0,
        _number(1.0),
        "the decoder's buffer at its largest (width × height × bytes per pixel); beyond, 413 before decoding",
    )
    max_model_mb: float = setting(
        "MAX_MODEL_MB", 1024.0, _number(1.0), "a larger model file is refused before it is downloaded or read"
    )
    body_timeout_s: float = setting(
        "BODY_TIMEOUT_S",
        30.0,
        _number(0.1),
        "an upload still arriving after this gets 408 (slow or stalled clients)",
    )
    api_key: str | None = setting(
        "API_KEY", None, _text, "when set, `/predict` and `/memory` need `Authorization: Bearer <key>`"
    )
    cors_origins: tuple[str, ...] = setting(
        "CORS_ORIGINS",
        (),
        _origins,
        "comma-separated origins allowed to call the API from a browser",
        shown="– (CORS off)",
    )
    litert_threads: int = setting(
        "LITERT_THREADS",
        1,
        _whole(1),
        "interpreter threads",
        shown="the cgroup CPU quota, rounded up",
    )
    max_queue: int = setting(
        "MAX_QUEUE",
        8,
        _whole(0),
        "predict requests in flight beyond the one running (receiving, waiting); beyond, 503 with `Retry-After`",
    )
    queue_timeout_s: float = setting(
        "QUEUE_TIMEOUT_S", 30.0, _number(0.0), "how long a request waits for the model before 503"
    )
    model_load_timeout_s: float = setting(
        "MODEL_LOAD_TIMEOUT_S",
        120.0,
        _number(0.1),
        "bound on fetching and loading the model: past it the load is abandoned (503 and `/health` say"
        " `LoadTimedOut`) and tried again after the backoff",
    )
    model_retry_s: float = setting(
        "MODEL_RETRY_S",
        5.0,
        _number(0.1),
        "after a failed load, 503s with `Retry-After` until the next attempt; the wait doubles per failure (at most 300 s)",
    )
    model_fetch_timeout_s: float = setting(
        "MODEL_FETCH_TIMEOUT_S", 120.0, _number(0.1), "bound on downloading the model"
    )
    # derived at cold start, not read from a variable of its own
    platform: str | None = field(default=None, metadata={"env": None})  # "render", "cloud-run"
    # the memory limit is the cgroup's (not MEMORY_LIMIT_MB): the cgroup's charge is then what counts
    memory_from_cgroup: bool = field(default=False, metadata={"env": None})

    @property
    def demo_refused(self) -> bool:
        """On a platform with no MODEL_URI, the synthetic demo is served only with ALLOW_DEMO_MODEL=true."""
        return self.platform is not None and self.serves_demo and not self.allow_demo_model

    @property
    def max_upload_bytes(self) -> int:
        """MAX_UPLOAD_MB in bytes."""
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_decode_bytes(self) -> int:
        """MAX_DECODE_MB in bytes."""
        return int(self.max_decode_mb * 1024 * 1024)

    @property
    def max_model_bytes(self) -> int:
        """MAX_MODEL_MB in bytes."""
        return int(self.max_model_mb * 1024 * 1024)

    @property
    def serves_demo(self) -> bool:
        """True when the model is the bundled synthetic demo."""
        return self.model_uri == str(DEMO_BUNDLE)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and validate the environment (``os.environ`` by default)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in _table():
            name = f.metadata["env"]
            raw = (env.get(name) or "").strip()
            if raw:
                values[f.name] = f.metadata["parse"](name, raw)
        if values.get("memory_limit_mb") is None:
            values["memory_limit_mb"] = cgroup_memory_limit_mb()
            values["memory_from_cgroup"] = values["memory_limit_mb"] is not None
        if values.get("memory_soft_limit_mb") is None and values["memory_limit_mb"] is not None:
            values["memory_soft_limit_mb"] = SOFT_LIMIT_SHARE * values["memory_limit_mb"]
        values.setdefault("litert_threads", available_cpus())
        values["platform"] = platform(env)
        return cls(**values)


def platform(env: Mapping[str, str]) -> str | None:
    """``render`` when Render runs us (it sets RENDER), ``cloud-run`` on Cloud Run/Functions (K_SERVICE)."""
    if (env.get("RENDER") or "").strip():
        return "render"
    if (env.get("K_SERVICE") or "").strip():
        return "cloud-run"
    return None


def _table() -> list[dataclasses.Field[Any]]:
    """The fields read from a variable of their own, in order."""
    return [f for f in dataclasses.fields(Settings) if f.metadata.get("env")]


def environment_variables() -> tuple[str, ...]:
    """Every variable :class:`Settings` reads."""
    return tuple(f.metadata["env"] for f in _table())


def markdown_table() -> str:
    """README's configuration table, from the field table (variable, default, meaning)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for f in _table():
        rows.append(f"| `{f.metadata['env']}` | {f.metadata['shown']} | {f.metadata['doc']} |")
    return "\n".join(rows)
