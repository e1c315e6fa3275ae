"""Folders of images as model inputs (int8 calibration today): read with the core's decoder, no TensorFlow.

A folder is read in sorted order; files that are not usable images are left out, counted and named
in one warning; too few usable images is an :class:`ExportError` that says what the folder held.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from dermal_fn.core.imaging import InputScale, Normalization, decode, model_input
from dermal_fn.errors import DatasetError, DermalError, ExportError, InvalidImage, UnsupportedMediaType

logger = logging.getLogger(__name__)

MIN_CALIBRATION_IMAGES = 8
MAX_CALIBRATION_FILES = 10_000  # files looked at before giving up on a folder


def calibration_images(
    folder: str | Path | None,
    size: tuple[int, int],
    scale: InputScale,
    *,
    limit: int = 100,
    resize: str = "bilinear",
    normalization: Normalization | None = None,
) -> list[np.ndarray]:
    """Model inputs from a folder of images, for int8 calibration; generated ones when none is given.

    Files that are not decodable images, blank (one colour) images and images under an eighth of the
    model's input side are left out and counted; fewer than ``MIN_CALIBRATION_IMAGES`` usable images
    is an :class:`ExportError` naming what the folder held instead.
    """
    if folder is None:
        logger.warning(
            "no --calibration folder given: calibrating int8 on generated images; "
            "pass a folder of real photos for a faithful int8 model"
        )
        return _generated_calibration(size, scale, count=min(limit, 64), normalization=normalization)
    files = image_files(folder, option="--calibration", suffixes=None, error=ExportError)
    inputs: list[np.ndarray] = []
    rejected: dict[str, list[str]] = {}  # reason -> file names
    for path in files[:MAX_CALIBRATION_FILES]:
        problem, pixels = _calibration_input(
            path, size=size, scale=scale, resize=resize, normalization=normalization
        )
        if problem is not None:
            rejected.setdefault(problem, []).append(path.name)
            continue
        assert pixels is not None
        inputs.append(pixels)
        if len(inputs) >= limit:
            break
    summary = "; ".join(
        f"{len(names)} {reason} (e.g. {names[0]})" for reason, names in sorted(rejected.items())
    )
    if len(inputs) < MIN_CALIBRATION_IMAGES:
        raise ExportError(
            f"expected at least {MIN_CALIBRATION_IMAGES} usable images in calibration folder {folder}, "
            f"found {len(inputs)} of {len(files)} files" + (f": {summary}" if summary else "")
        )
    if rejected:
        logger.warning("calibration: left out %s", summary)
    return inputs


def _calibration_input(
    path: Path, *, size: tuple[int, int], scale: InputScale, resize: str, normalization: Normalization | None
) -> tuple[str | None, np.ndarray | None]:
    """(None, model input) for a usable calibration image, else (the reason, None)."""
    try:
        decoded = decode(path.read_bytes(), min_side=max(size))
    except UnsupportedMediaType:
        return "files of an unsupported image type", None
    except InvalidImage:
        return "files that are not decodable images", None
    except OSError:
        return "unreadable files", None
    rgb = np.asarray(decoded.rgb)
    if min(decoded.rgb.size) < max(1, min(size) // 8):
        return f"images smaller than {max(1, min(size) // 8)} px on a side", None
    if int(rgb.max()) - int(rgb.min()) < 2:
        return "blank (one-colour) images", None
    return None, model_input(decoded.rgb, size=size, scale=scale, resize=resize, normalization=normalization)


def _generated_calibration(
    size: tuple[int, int], scale: InputScale, *, count: int, normalization: Normalization | None
) -> list[np.ndarray]:
    from PIL import Image

    from dermal_fn.demo import synth

    images, _, _ = synth.generate_batch(count, seed=1234, size=max(size))
    return [
        model_input(Image.fromarray(img, mode="RGB"), size=size, scale=scale, normalization=normalization)
        for img in images
    ]


IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})


def labelled_files(root: str | Path, labels: tuple[str, ...]) -> list[tuple[Path, int]]:
    """``(file, class index)`` for a folder with one sub-folder per label (``image_dataset_from_directory``'s layout).

    Every sub-folder must be named after one of ``labels``; a label may have no folder (it is
    counted as absent). Files are the image suffixes, sorted; hidden files are left out.
    """
    folder = Path(root)
    if not folder.is_dir():
        raise DatasetError(f"expected a folder with one sub-folder per label, found nothing at {folder}")
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in subfolders if p.name not in labels]
    if unknown:
        raise DatasetError(f"expected sub-folders named after the labels {list(labels)}, found {unknown[:5]}")
    files = [
        (path, labels.index(sub.name))
        for sub in subfolders
        for path in sorted(sub.rglob("*"))
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")
    ]
    if not files:
        raise DatasetError(f"expected images in the label sub-folders of {folder}, found none")
    return files


def image_files(
    root: str | Path,
    *,
    limit: int | None = None,
    option: str = "the folder",
    suffixes: frozenset[str] | None = IMAGE_SUFFIXES,
    error: type[DermalError] = DatasetError,
) -> list[Path]:
    """The files anywhere under ``root``, sorted, hidden ones left out; at most ``limit``.

    ``suffixes``: only files with these endings (None: every file, for the decoder to judge).
    ``option`` names the folder in errors (``--images``); ``error`` is the exception raised.
    """
    folder = Path(root)
    if not folder.is_dir():
        found = "nothing" if not folder.exists() else "a file"
        raise error(f"expected {option} to be a folder of images, found {found} at {folder}")
    every = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    files = every if suffixes is None else [p for p in every if p.suffix.lower() in suffixes]
    if not files:
        found = "an empty folder" if not every else f"no image files among {len(every)}"
        raise error(f"expected {option} folder {folder} to hold images, found {found}")
    return files[:limit] if limit else files
