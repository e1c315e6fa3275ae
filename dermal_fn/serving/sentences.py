"""The assessment as sentences a clinician reads, in English or Vietnamese.

The same sentences as the upload page's, for apps that call :func:`dermal_fn.predict` and show its
answer themselves (the Django example): photo quality with what to do about it, unlike the
calibration data, uncertain; or one sentence that nothing was flagged. Never a diagnosis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dermal_fn.serving.shapes import AssessmentJson

Language = Literal["en", "vi"]
LANGUAGES: tuple[Language, ...] = ("en", "vi")

_LOOKS = {
    "en": {
        "blurry": "blurry",
        "too_dark": "too dark",
        "too_bright": "overexposed",
        "low_resolution": "too small",
    },
    "vi": {
        "blurry": "bị mờ",
        "too_dark": "quá tối",
        "too_bright": "bị cháy sáng",
        "low_resolution": "quá nhỏ",
    },
}
_ADVICE = {
    "en": {
        "blurry": "holding the camera steady and letting it focus",
        "too_dark": "in good light",
        "too_bright": "out of direct sun and without flash",
        "low_resolution": "closer, at the camera's full resolution",
    },
    "vi": {
        "blurry": "giữ máy thật vững và chờ máy lấy nét",
        "too_dark": "ở nơi đủ ánh sáng",
        "too_bright": "tránh nắng trực tiếp và không dùng đèn flash",
        "low_resolution": "ở gần hơn, với độ phân giải đầy đủ của máy",
    },
}
_TEXT = {
    "en": {
        "and": "and",
        "quality": "This photo looks {looks} — retake it {advice}.",
        "out": "This photo is unlike the images the model was calibrated on: treat the result with caution.",
        "unknown": "This model was never calibrated, so nothing here says whether the photo is like its "
        "training images; its percentages may be overconfident.",
        "uncertain": "The model is not confident: its top answer ({top}) is below the {threshold} it needs "
        "to be trusted.",
        "fine": "The photo looks usable, is like the model's calibration images, and the top answer clears "
        "the model's confidence threshold.",
    },
    "vi": {
        "and": "và",
        "quality": "Ảnh này có vẻ {looks} — hãy chụp lại {advice}.",
        "out": "Ảnh này không giống những ảnh mà mô hình đã được hiệu chỉnh: hãy thận trọng với kết quả.",
        "unknown": "Mô hình này chưa từng được hiệu chỉnh, nên không có gì cho biết ảnh có giống ảnh huấn "
        "luyện hay không; các tỉ lệ phần trăm có thể quá tự tin.",
        "uncertain": "Mô hình không chắc chắn: câu trả lời cao nhất ({top}) thấp hơn mức {threshold} cần có "
        "để được tin cậy.",
        "fine": "Ảnh dùng được, giống các ảnh hiệu chỉnh của mô hình, và câu trả lời cao nhất vượt ngưỡng tin "
        "cậy của mô hình.",
    },
}


@dataclass(frozen=True)
class Sentence:
    """One sentence about an answer: ``kind`` quality, distribution, confidence or fine; ``warn`` unless fine."""

    kind: str
    text: str
    warn: bool = True


def _joined(words: list[str], conjunction: str) -> str:
    return words[0] if len(words) < 2 else ", ".join(words[:-1]) + f" {conjunction} " + words[-1]


def _percent(value: float) -> str:
    return f"{100.0 * value:.0f} %"


def assessment_sentences(assessment: AssessmentJson, *, language: Language = "en") -> list[Sentence]:
    """What the assessment says, as sentences: warnings first, or one sentence that nothing was flagged."""
    if language not in LANGUAGES:
        raise ValueError(f"expected a language in {LANGUAGES}, found {language!r}")
    text, looks, advice = _TEXT[language], _LOOKS[language], _ADVICE[language]
    out: list[Sentence] = []
    quality = assessment["quality"]
    issues = [issue for issue in quality["issues"] if issue in looks]
    if quality["status"] == "poor" and issues:
        out.append(
            Sentence(
                "quality",
                text["quality"].format(
                    looks=_joined([looks[i] for i in issues], text["and"]),
                    advice=_joined([advice[i] for i in issues], text["and"]),
                ),
            )
        )
    distribution = assessment["distribution"]["status"]
    if distribution in ("out", "unknown"):
        out.append(Sentence("distribution", text[distribution]))
    confidence = assessment["confidence"]
    if confidence["status"] == "uncertain":
        out.append(
            Sentence(
                "confidence",
                text["uncertain"].format(
                    top=_percent(confidence["max_probability"]), threshold=_percent(confidence["threshold"])
                ),
            )
        )
    return out or [Sentence("fine", text["fine"], warn=False)]
