"""Prediction options (top_k, class, score, gradcam), validated the same way for HTTP and the CLI."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from dermal_fn.core.head import SCORES, Score
from dermal_fn.errors import ConfigError, InvalidOption
from dermal_fn.serving.config import parse_bool

DEFAULT_TOP_K = 3
OPTION_NAMES = ("top_k", "class", "score", "gradcam", "assess", "overlay")
# what the heatmap comes as: the photo with it blended on (``overlay_png``, the default), the
# coloured heatmap alone with alpha to lay over the photo (``heatmap_png``, ~10x cheaper), or the grid only
Overlay = Literal["png", "heatmap", "none"]
OVERLAYS: tuple[Overlay, ...] = get_args(Overlay)


@dataclass(frozen=True)
class PredictOptions:
    """What a caller asked for."""

    top_k: int = DEFAULT_TOP_K
    class_: int | str | None = None  # index or label; None: the most probable class
    score: Score = "logit"
    gradcam: bool | None = None  # None: ENABLE_GRADCAM decides
    assess: bool = True  # the assessment (quality, distribution, confidence) beside the answer
    overlay: Overlay = "png"

    @classmethod
    def parse(cls, values: Mapping[str, Any]) -> PredictOptions:
        """Options from query parameters, form fields or JSON keys; 422 for bad values."""
        top_k = DEFAULT_TOP_K
        raw = values.get("top_k")
        if raw is not None and raw != "":
            if isinstance(raw, bool) or not _is_int(raw):
                raise InvalidOption(f"expected top_k to be a whole number >= 1, found {_show(raw)}")
            top_k = int(raw)
            if top_k < 1:
                raise InvalidOption(f"expected top_k >= 1, found {_show(top_k)}")
        class_: int | str | None = None
        raw = values.get("class")
        if raw is not None and raw != "":
            if isinstance(raw, (bool, float)) or not isinstance(raw, (int, str)):
                raise InvalidOption(f"expected class to be an index or a label, found {_show(raw)}")
            class_ = int(raw) if isinstance(raw, int) or _is_int(raw) else str(raw)
        score: Score = _choice(values, "score", SCORES, default="logit")
        overlay: Overlay = _choice(values, "overlay", OVERLAYS, default="png")
        gradcam = _flag(values, "gradcam")
        assess = _flag(values, "assess")
        return cls(
            top_k=top_k,
            class_=class_,
            score=score,
            gradcam=gradcam,
            assess=True if assess is None else assess,
            overlay=overlay,
        )

    def checked(self, labels: tuple[str, ...]) -> CheckedOptions:
        """Check top_k and class against the model's labels; the class becomes an index, once."""
        n = len(labels)
        if self.top_k > n:
            raise InvalidOption(
                f"expected top_k between 1 and {n} (the model has {n} classes), found {_show(self.top_k)}"
            )
        return CheckedOptions(
            top_k=self.top_k,
            class_index=None if self.class_ is None else class_index(self.class_, labels),
            score=self.score,
            gradcam=self.gradcam,
            assess=self.assess,
            overlay=self.overlay,
        )


@dataclass(frozen=True)
class CheckedOptions:
    """Options checked against one model: what the engine and the answer are made from."""

    top_k: int
    class_index: int | None  # None: the most probable class
    score: Score
    gradcam: bool | None
    assess: bool = True
    overlay: Overlay = "png"


def class_index(value: int | str, labels: tuple[str, ...]) -> int:
    """A class given as an index or a label, as an index; InvalidOption when it names no class."""
    n = len(labels)
    if isinstance(value, str) and not _is_int(value):
        if value not in labels:
            raise InvalidOption(
                f"expected class to be an index 0..{n - 1} or one of {list(labels)}, found {_show(value)}"
            )
        return labels.index(value)
    index = int(value)
    if not 0 <= index < n:
        raise InvalidOption(f"expected class index 0..{n - 1}, found {_show(index)}")
    return index


def _choice(values: Mapping[str, Any], name: str, choices: tuple[str, ...], *, default: str) -> Any:
    """One of ``choices`` (``default`` when absent or empty); 422 for anything else."""
    raw = values.get(name)
    if raw is None or raw == "":
        return default
    if raw not in choices:
        raise InvalidOption(f"expected {name} to be one of {list(choices)}, found {_show(raw)}")
    return raw


def _flag(values: Mapping[str, Any], name: str) -> bool | None:
    """A true/false option (None when absent); 422 for anything else."""
    raw = values.get(name)
    if raw is None or raw == "":
        return None
    if not isinstance(raw, (bool, str)):
        raise InvalidOption(f"expected {name} to be true or false, found {_show(raw)}")
    try:
        return parse_bool(raw, name=name)
    except ConfigError:
        raise InvalidOption(f"expected {name} to be true or false, found {_show(raw)}") from None


def _is_int(value: Any) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return True
    if isinstance(value, str):
        text = value.strip()
        digits = text[1:] if text[:1] in ("+", "-") else text
        # ASCII only: "²".isdigit() is True but int("²") fails
        return digits.isascii() and digits.isdigit() and len(text) <= 12
    return False


def _show(value: Any) -> str:
    """A short rendering of a client's value for a message: long values are described, not echoed."""
    if isinstance(value, str) and (len(value) > 40 or not value.isprintable()):
        return f"a string of {len(value)} characters"
    if isinstance(value, (list, dict)):
        return f"a JSON {'array' if isinstance(value, list) else 'object'}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**12:
        return f"a number of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= 40 else f"a {type(value).__name__}"
