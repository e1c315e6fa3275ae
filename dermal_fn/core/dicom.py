"""DICOM images (a dermatology VL Photographic Image, say): their pixel data, and nothing else of them.

:func:`first_frame` reads the pixels of the first frame (uncompressed, or JPEG baseline through
Pillow) as an RGB or greyscale Pillow image. The size is checked from ``Rows`` x ``Columns`` before
any pixel is decoded. No tag value (names, IDs, dates) is ever put into a message, a log line or
the answer: errors name what is missing or wrong by its keyword only, pydicom's own warnings and
log records are silenced while the file is read, and the dataset is dropped as soon as the frame
is decoded.
"""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
from PIL import Image

from dermal_fn.errors import InvalidImage, UnsupportedMediaType

EXPECTED = "a DICOM image with pixel data (uncompressed or JPEG baseline)"
# transfer syntaxes whose pixel data we decode: implicit/explicit VR little endian, deflated,
# explicit big endian, and JPEG baseline (Pillow decodes it)
DECODABLE = frozenset(
    {
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.1.99",
        "1.2.840.10008.1.2.2",
        "1.2.840.10008.1.2.4.50",
    }
)


def first_frame(data: bytes, *, max_pixels: int) -> Image.Image:
    """The first frame of a DICOM file's pixel data as a Pillow image (RGB, or L for greyscale)."""
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
        from pydicom.pixels import pixel_array
    except ImportError:
        raise UnsupportedMediaType(
            "expected DICOM support on this server (pydicom), found it not installed"
        ) from None
    quiet = logging.getLogger("pydicom")
    previous = quiet.disabled
    quiet.disabled = True  # its records may quote tag values
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                dataset = pydicom.dcmread(io.BytesIO(data), force=False)
            except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError) as exc:
                raise InvalidImage(
                    f"expected {EXPECTED}, found a damaged DICOM file ({type(exc).__name__})"
                ) from None
            if "PixelData" not in dataset:
                raise InvalidImage(f"expected {EXPECTED}, found a DICOM file without pixel data")
            syntax = str(getattr(dataset.file_meta, "TransferSyntaxUID", ""))
            if syntax not in DECODABLE:
                raise UnsupportedMediaType(
                    f"expected {EXPECTED}, found pixel data compressed another way; export the image as JPEG"
                )
            rows, columns = int(dataset.get("Rows", 0) or 0), int(dataset.get("Columns", 0) or 0)
            if rows <= 0 or columns <= 0:
                raise InvalidImage(f"expected {EXPECTED}, found no Rows or Columns")
            if rows * columns > max_pixels:
                raise InvalidImage(
                    f"expected at most {max_pixels / 1e6:.0f} megapixels, found a DICOM frame of "
                    f"{rows * columns / 1e6:.0f} megapixels"
                )
            try:
                frame = pixel_array(dataset, index=0)  # the first frame only, converted to RGB
            except Exception as exc:  # pydicom's decoders raise many kinds: none carries a tag value out
                raise InvalidImage(
                    f"expected {EXPECTED}, found pixel data we cannot decode ({type(exc).__name__})"
                ) from None
            monochrome1 = str(dataset.get("PhotometricInterpretation", "")) == "MONOCHROME1"
            del dataset
    finally:
        quiet.disabled = previous
    return _as_image(frame, invert=monochrome1)


def _as_image(frame: np.ndarray, *, invert: bool) -> Image.Image:
    """8-bit RGB stays as it is; other depths and greyscale are scaled to 0-255 by their own range."""
    if frame.ndim == 3 and frame.shape[-1] == 3 and frame.dtype == np.uint8:
        return Image.fromarray(frame, mode="RGB")
    if frame.ndim == 3 and frame.shape[-1] == 3:
        return Image.fromarray(_to_uint8(frame), mode="RGB")
    if frame.ndim == 2:
        grey = _to_uint8(frame)
        return Image.fromarray(255 - grey if invert else grey, mode="L")
    raise InvalidImage(f"expected {EXPECTED}, found pixel data of shape {tuple(frame.shape)}")


def _to_uint8(frame: np.ndarray) -> np.ndarray:
    values = frame.astype(np.float32)
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) * (255.0 / max(high - low, 1e-6))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
