"""What fetch_model returns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class FetchedModel:
    """A verified local copy of a model file.

    ``generation`` is the GCS object generation (None for local files); ``downloaded`` is False
    when a local file or an already cached copy was used; ``seconds`` is the whole fetch's time.
    """

    path: Path
    sha256: str
    size: int
    source: str
    generation: int | None
    downloaded: bool
    seconds: float
