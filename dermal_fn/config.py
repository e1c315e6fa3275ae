"""Configuration: read from the environment in one place, into a frozen dataclass, validated at cold start."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dermal_fn.errors import ConfigError
from dermal_fn.memory import available_cpus, cgroup_memory_limit_mb
from model_fetch.digest import normalize_sha256

PACKAGE_DIR = Path(__file__).resolve().parent
DEMO_BUNDLE = PACKAGE_DIR / "models" / "synthetic_demo.dermal"

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


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


@dataclass(frozen=True)
class Settings:
    """Everything the service reads from its environment."""

    model_uri: str = str(DEMO_BUNDLE)
    model_sha256: str | None = None
    model_cache_dir: str | None = None
    enable_gradcam: bool = True
    memory_limit_mb: float | None = None  # MEMORY_LIMIT_MB, else the container's limit (cgroup); MiB
    memory_soft_limit_mb: float | None = None  # above it heatmaps are skipped; default 90 % of the limit
    max_upload_mb: float = 10.0
    max_image_megapixels: float = 24.0  # JPEGs, decoded at reduced size, may have 4x as many
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    litert_threads: int = 1  # LITERT_THREADS, else the cgroup CPU quota rounded up (at least 1)
    max_queue: int = 8  # requests waiting for the model beyond the one running
    queue_timeout_s: float = 30.0
    model_load_timeout_s: float = 120.0
    model_fetch_timeout_s: float = 120.0

    @property
    def max_upload_bytes(self) -> int:
        """MAX_UPLOAD_MB in bytes."""
        return int(self.max_upload_mb * 1024 * 1024)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and validate the environment (``os.environ`` by default)."""
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(name)
            return value.strip() if value is not None and value.strip() != "" else None

        def number(name: str, default: float | None, *, minimum: float = 0.0) -> float | None:
            raw = get(name)
            if raw is None:
                return default
            try:
                value = float(raw)
            except ValueError:
                raise ConfigError(f"expected {name} to be a number, found {raw!r}") from None
            if value < minimum:
                raise ConfigError(f"expected {name} >= {minimum:g}, found {raw!r}")
            return value

        try:
            sha = normalize_sha256(get("MODEL_SHA256"))
        except ValueError:
            raise ConfigError(
                f"expected MODEL_SHA256 to be 64 hex digits, found {get('MODEL_SHA256')!r}"
            ) from None
        limit = number("MEMORY_LIMIT_MB", None, minimum=1.0)
        if limit is None:
            limit = cgroup_memory_limit_mb()
        soft = number("MEMORY_SOFT_LIMIT_MB", None, minimum=0.0)
        if soft is None and limit is not None:
            soft = 0.9 * limit
        threads = get("LITERT_THREADS")
        if threads is not None and not (threads.isdigit() and int(threads) >= 1):
            raise ConfigError(f"expected LITERT_THREADS to be a whole number >= 1, found {threads!r}")
        origins = tuple(o.strip() for o in (get("CORS_ORIGINS") or "").split(",") if o.strip())
        return cls(
            model_uri=get("MODEL_URI") or str(DEMO_BUNDLE),
            model_sha256=sha,
            model_cache_dir=get("MODEL_CACHE_DIR"),
            enable_gradcam=parse_bool(get("ENABLE_GRADCAM") or "true", name="ENABLE_GRADCAM"),
            memory_limit_mb=limit,
            memory_soft_limit_mb=soft,
            max_upload_mb=float(number("MAX_UPLOAD_MB", 10.0, minimum=0.001) or 10.0),
            max_image_megapixels=float(number("MAX_IMAGE_MEGAPIXELS", 24.0, minimum=0.001) or 24.0),
            api_key=get("API_KEY"),
            cors_origins=origins,
            litert_threads=int(threads) if threads is not None else available_cpus(),
            max_queue=int(number("MAX_QUEUE", 8, minimum=0.0) or 0),
            queue_timeout_s=float(number("QUEUE_TIMEOUT_S", 30.0, minimum=0.0) or 0.0),
            model_load_timeout_s=float(number("MODEL_LOAD_TIMEOUT_S", 120.0, minimum=0.1) or 120.0),
            model_fetch_timeout_s=float(number("MODEL_FETCH_TIMEOUT_S", 120.0, minimum=0.1) or 120.0),
        )
