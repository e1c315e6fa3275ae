"""What phones and clinics send: HEIC (iPhone, Samsung), AVIF, and DICOM (a VL Photographic Image).

Each is made here by the library that writes it (pillow-heif, Pillow, pydicom), decoded within the
same pixel and byte budget as every format, and answered like a JPEG of the same picture; a DICOM
file's tags (the patient's name, IDs, dates) appear in no answer and no log line.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from dermal_fn.core import imaging
from dermal_fn.errors import ImageTooLarge, InvalidImage, UnsupportedMediaType
from tests import hostile_fixtures as hf

PATIENT = "Nguyen^Van An"
PATIENT_ID = "BN-2026-004211"


def picture(width: int = 320, height: int = 240, seed: int = 4) -> Image.Image:
    drawn = hf.lesion(seed=seed, size=max(width, height)).image
    return Image.fromarray(drawn).resize((width, height))


def encoded(image: Image.Image, fmt: str, **params: Any) -> bytes:
    if fmt == "HEIF":
        import pillow_heif

        pillow_heif.register_heif_opener()
    out = io.BytesIO()
    image.save(out, format=fmt, **params)
    return out.getvalue()


def dicom(image: Image.Image, *, jpeg: bool = False, frames: int = 1, grey: bool = False) -> bytes:
    """A VL Photographic Image Storage file with the picture as its pixel data, and a patient in its tags."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID, ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.77.1.4")  # VL Photographic Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit if jpeg else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.StudyDate = (
        PATIENT,
        PATIENT_ID,
        "19800101",
        "20261206",
    )
    ds.Modality = "XC"
    pixels = np.asarray(image.convert("L" if grey else "RGB"))
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 1 if grey else 3
    ds.PhotometricInterpretation = "MONOCHROME2" if grey else ("YBR_FULL_422" if jpeg else "RGB")
    if not grey:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if jpeg:
        ds.PixelData = encapsulate([encoded(image.convert("RGB"), "JPEG", quality=95)] * frames)
        ds["PixelData"].is_undefined_length = True
    else:
        ds.PixelData = np.concatenate([pixels.reshape(-1)] * frames).tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def mean_abs(a: Image.Image, b: Image.Image) -> float:
    return float(np.mean(np.abs(np.asarray(a, np.float32) - np.asarray(b.resize(a.size), np.float32))))


@pytest.mark.parametrize(
    ("make", "kind", "tolerance"),
    [
        (lambda p: encoded(p, "HEIF", quality=90), "HEIF", 12.0),
        (lambda p: encoded(p, "AVIF", quality=90), "AVIF", 12.0),
        (lambda p: dicom(p), "DICOM", 0.5),
        (lambda p: dicom(p, jpeg=True), "DICOM", 12.0),
        (lambda p: dicom(p, frames=3), "DICOM", 0.5),
    ],
    ids=["heic", "avif", "dicom-uncompressed", "dicom-jpeg-baseline", "dicom-multiframe"],
)
def test_phone_and_clinic_formats_decode_to_the_picture(make: Any, kind: str, tolerance: float) -> None:
    original = picture()
    data = make(original)
    assert imaging.sniff(data) == kind
    decoded = imaging.decode(data, min_side=200)
    assert decoded.format == kind and decoded.original_size == original.size
    assert mean_abs(decoded.rgb, original) < tolerance


def test_a_greyscale_dicom_becomes_grey_rgb() -> None:
    decoded = imaging.decode(dicom(picture(), grey=True), min_side=200)
    rgb = np.asarray(decoded.rgb)
    assert rgb.shape[-1] == 3 and np.array_equal(rgb[..., 0], rgb[..., 1])


@pytest.mark.parametrize(
    ("make", "error", "words"),
    [
        (lambda: hf.heic(), InvalidImage, "expected a complete HEIC photo, found a damaged one"),
        (lambda: encoded(picture(), "HEIF")[:300], InvalidImage, "HEIC photo"),
        (lambda: dicom(picture())[:400], InvalidImage, "DICOM"),
        (lambda: dicom(picture(6000, 4001)), InvalidImage, "megapixels"),
        (lambda: hf.mp4(), UnsupportedMediaType, "a video"),
    ],
    ids=["heic-header-only", "heic-cut-short", "dicom-cut-short", "dicom-over-24-mp", "video"],
)
def test_damaged_or_oversized_ones_are_said_in_words(make: Any, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words) as raised:
        imaging.decode(make(), min_side=200)
    assert PATIENT not in str(raised.value) and PATIENT_ID not in str(raised.value)


def test_a_heic_over_the_byte_budget_is_refused_before_decoding() -> None:
    data = encoded(picture(1600, 1200), "HEIF", quality=50)
    with pytest.raises(ImageTooLarge):
        imaging.decode(data, min_side=200, max_bytes=1_000_000)


def test_dicom_tags_reach_no_answer_and_no_log_line(
    configure: Any, dermal_app: Any, small_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    configure(MODEL_URI=str(small_bundle))
    client = dermal_app.test_client()
    with caplog.at_level("DEBUG"):
        good = client.post("/predict", data=dicom(picture()), content_type="application/dicom")
        bad = client.post("/predict", data=dicom(picture())[:600], content_type="application/octet-stream")
    assert good.status_code == 200, good.get_data(as_text=True)
    assert bad.status_code == 400 and bad.get_json()["error"]["code"] == "invalid_image"
    for text in (good.get_data(as_text=True), bad.get_data(as_text=True), caplog.text):
        for secret in (PATIENT, "Nguyen", PATIENT_ID, "19800101"):
            assert secret not in text
    assert json.loads(good.get_data())["gradcam"]["status"] == "ok"


def test_an_iphone_heic_photo_is_answered_like_its_jpeg(
    configure: Any, dermal_app: Any, small_bundle: Path
) -> None:
    configure(MODEL_URI=str(small_bundle))
    client = dermal_app.test_client()
    photo = picture(640, 480)
    as_heic = client.post(
        "/predict", data=encoded(photo, "HEIF", quality=95), content_type="image/heic"
    ).get_json()
    as_jpeg = client.post(
        "/predict", data=encoded(photo, "JPEG", quality=95), content_type="image/jpeg"
    ).get_json()
    assert [p["label"] for p in as_heic["predictions"]] == [p["label"] for p in as_jpeg["predictions"]]
    assert abs(as_heic["predictions"][0]["probability"] - as_jpeg["predictions"][0]["probability"]) < 0.05
