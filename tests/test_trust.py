"""Trust signals: the numbers against independent oracles, calibrate/evaluate end to end, the assessment.

Fit on generated images, evaluate on held-out generated images and on non-skin images
(``dermal_fn.demo.unlike``: text, flat colour, noise, shapes, patterns, gradients); each quality
issue is triggered by a photo transformed to have it and not by the original.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from dermal_fn.core import bundle as bundle_format
from dermal_fn.core import trust
from dermal_fn.core.engine import LiteRTEngine
from dermal_fn.demo import synth, unlike
from dermal_fn.errors import BundleError
from dermal_fn.models import DEMO_BUNDLE
from dermal_fn.tools.cli import main as cli
from dermal_fn.tools.evaluate import evaluate
from dermal_fn.tools.trust import calibrate
from tests import hostile_fixtures as hf

# --- the numbers ------------------------------------------------------------------------------------


def test_fitted_temperature_recovers_the_one_the_labels_were_drawn_with() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(4000, 5))
    labels = np.array([rng.choice(5, p=p) for p in trust.softmax(logits / 2.5)])
    fitted = trust.fit_temperature(logits, labels, output="softmax", binary=False)
    assert fitted == pytest.approx(2.5, rel=0.08)
    before = trust.ece(trust.softmax(logits), labels)
    after = trust.ece(trust.softmax(logits / fitted), labels)
    assert after < before / 3


def test_ece_and_nll_by_hand() -> None:
    p = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    y = np.array([0, 1, 1, 0])
    # bins (0.6, 0.667]: one answer, right, conf 0.6; (0.667,0.733]: 0.7 right; (0.8]: wrong; (0.9]: right
    expected = (abs(1 - 0.6) + abs(1 - 0.7) + abs(0 - 0.8) + abs(1 - 0.9)) / 4
    assert trust.ece(p, y) == pytest.approx(expected)
    assert trust.nll(p, y) == pytest.approx(-np.mean(np.log([0.9, 0.2, 0.7, 0.6])))


def test_auroc_is_the_share_of_pairs_ranked_right() -> None:
    rng = np.random.default_rng(1)
    pos, neg = np.round(rng.normal(1, 1, 60), 1), np.round(rng.normal(0, 1, 80), 1)  # ties on purpose
    pairs = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg)]
    assert trust.auroc(pos, neg) == pytest.approx(np.mean(pairs))
    assert math.isnan(trust.auroc([], neg))


def test_abstention_threshold_keeps_the_accepted_answers_above_the_target() -> None:
    p = np.array([[0.99, 0.01], [0.95, 0.05], [0.9, 0.1], [0.7, 0.3], [0.6, 0.4], [0.55, 0.45]])
    y = np.array([0, 0, 0, 1, 0, 1])  # wrong at 0.7 and 0.55
    threshold, coverage, accuracy = trust.abstention_threshold(p, y, target_accuracy=0.8)
    assert (
        threshold == pytest.approx(0.6)
        and coverage == pytest.approx(5 / 6)
        and accuracy == pytest.approx(0.8)
    )
    assert trust.abstention_threshold(p, np.ones(6, dtype=int), target_accuracy=0.9)[0] == 1.0  # unreachable


def test_distribution_score_is_the_mahalanobis_distance_at_full_rank() -> None:
    """The oracle: (x - mu)^T inv(cov) (x - mu) with NumPy's inverse, when every direction is kept."""
    rng = np.random.default_rng(2)
    mixing = rng.normal(size=(6, 6))
    features = np.concatenate([rng.normal(size=(200, 6)) @ mixing + shift for shift in (0.0, 3.0)])
    labels = np.repeat([0, 1], 200)
    model = trust.DistributionModel.fit(features, labels, rank=6)
    means = [features[labels == k].mean(axis=0) for k in (0, 1)]
    centred = np.concatenate([features[labels == k] - means[k] for k in (0, 1)])
    precision = np.linalg.inv(centred.T @ centred / (len(features) - 2))
    probe = rng.normal(size=(5, 6)) @ mixing
    expected = [min((x - m) @ precision @ (x - m) for m in means) / 6 for x in probe]
    np.testing.assert_allclose(model.scores(probe), expected, rtol=1e-6)


def test_distribution_score_separates_and_round_trips() -> None:
    rng = np.random.default_rng(3)
    features = rng.normal(size=(300, 40))
    labels = rng.integers(0, 3, 300)
    model = trust.DistributionModel.fit(features, labels, rank=10)
    model = model.with_threshold(trust.cross_fitted_threshold(features, labels))
    held_out = rng.normal(size=(200, 40))
    far = rng.normal(size=(200, 40)) * 3 + 2
    assert 0.85 <= np.mean(model.scores(held_out) <= model.threshold) <= 1.0
    assert np.mean(model.scores(far) > model.threshold) == 1.0
    back = trust.DistributionModel.from_arrays(model.to_arrays(), threshold=model.threshold)
    np.testing.assert_allclose(back.scores(far[:5]), model.scores(far[:5]), rtol=1e-4)


# --- photo quality ------------------------------------------------------------------------------------


def _photos(n: int = 6, size: int = 512) -> list[Image.Image]:
    rng = np.random.default_rng(5)
    return [Image.fromarray(synth.generate(rng, size=size, hair=False).image) for _ in range(n)]


TRANSFORMS = {
    "blurry": lambda im: im.filter(ImageFilter.GaussianBlur(6)),
    "too_dark": lambda im: ImageEnhance.Brightness(im).enhance(0.2),
    "too_bright": lambda im: ImageEnhance.Brightness(im).enhance(4.0),
    "low_resolution": lambda im: im.resize((60, 60), Image.Resampling.BOX),
}


@pytest.mark.parametrize("shape", [(1,), (2,), (7, 3), (256, 192), (1, 1000)])
def test_percentiles_are_numpys_linear_percentiles(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(len(shape) * 1000 + shape[-1])
    for values in (rng.integers(0, 256, shape).astype(np.float32), rng.normal(size=shape)):
        qs = (0.0, 10.0, 37.5, 50.0, 90.0, 100.0)
        expected = np.asarray(np.percentile(values, qs), dtype=np.float64)
        np.testing.assert_allclose(np.asarray(trust.percentiles(values, qs)), expected, rtol=0, atol=1e-9)


def test_percentiles_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError):
        trust.percentiles(np.zeros((0,)), (10.0,))


def test_no_generated_skin_photo_of_any_tone_is_called_poor() -> None:
    """150 generated photos (every skin tone, vignette and hair the generator draws): all "ok"."""
    rng = np.random.default_rng(77)
    for _ in range(150):
        image = Image.fromarray(synth.generate(rng, size=384).image)
        found = trust.photo_quality(image, original_size=image.size, input_size=(128, 128))
        assert found["status"] == "ok", found


@pytest.mark.parametrize("issue", sorted(TRANSFORMS))
def test_each_quality_issue_comes_from_its_transform_only(issue: str) -> None:
    for original in _photos():
        plain = trust.photo_quality(original, original_size=original.size, input_size=(128, 128))
        assert plain["status"] == "ok", plain
        changed = TRANSFORMS[issue](original)
        found = trust.photo_quality(changed, original_size=changed.size, input_size=(128, 128))
        assert issue in found["issues"] and found["status"] == "poor", found


# --- calibrate and evaluate, end to end ---------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trust")
    synth.save_labelled(root / "fit", 240, seed=21)
    synth.save_labelled(root / "test", 120, seed=22)
    unlike.save_unlike(root / "unlike", 60, seed=23)
    return {name: root / name for name in ("fit", "test", "unlike")}


@pytest.fixture(scope="module")
def calibrated_demo(
    folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("calibrated") / "demo.dermal"
    section = calibrate(DEMO_BUNDLE, folders["fit"], out, progress=None)
    return out, section


def test_calibration_lowers_held_out_ece_and_nll(calibrated_demo: tuple[Path, dict[str, Any]]) -> None:
    _, section = calibrated_demo
    before, after = section["evaluation"]["before"], section["evaluation"]["after"]
    assert section["evaluation"]["on"] == "held-out"
    assert after["ece"] <= before["ece"] and after["nll"] <= before["nll"]
    assert after["accuracy"] == before["accuracy"]  # a temperature never changes the top class
    assert section["data"]["images"] == 240 and sum(section["data"]["per_class"].values()) == 240
    assert len(section["data"]["sha256"]) == 64


def test_calibrated_bundle_keeps_backbone_and_head(calibrated_demo: tuple[Path, dict[str, Any]]) -> None:
    out, section = calibrated_demo
    original, calibrated = bundle_format.read(DEMO_BUNDLE), bundle_format.read(out)
    size = original.manifest.backbone_bytes
    assert out.read_bytes()[:size] == DEMO_BUNDLE.read_bytes()[:size]
    assert calibrated.calibration is not None and calibrated.calibration.temperature == section["temperature"]
    engine = LiteRTEngine(out, sha256="x")
    pixels = np.full((1, 128, 128, 3), 140.0, dtype=np.float32)
    result = engine.run(pixels)
    expected = trust.calibrated(
        result.logits, temperature=section["temperature"], output="softmax", binary=False
    )
    np.testing.assert_allclose(result.probabilities, expected)
    plain = LiteRTEngine(DEMO_BUNDLE, sha256="y")
    plain.calibration = None
    assert plain.run(pixels).grid == pytest.approx(result.grid)  # the logit-score heatmap does not move


def test_evaluate_tells_skin_from_everything_else(
    calibrated_demo: tuple[Path, dict[str, Any]], folders: dict[str, Path]
) -> None:
    out, _ = calibrated_demo
    report = evaluate(out, folders["test"], ood=folders["unlike"], progress=None)
    assert report["balanced_accuracy"] >= 0.95
    assert report["ood"]["distribution_auroc"] >= 0.99
    assert report["ood"]["flagged_out"] >= 0.95
    assert report["flagged_out"]["data"] <= 0.1
    assert {c["label"] for c in report["per_class"]} == set(synth.LABELS)


def test_the_cli_prints_the_tables_and_writes_json(
    calibrated_demo: tuple[Path, dict[str, Any]],
    folders: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out, _ = calibrated_demo
    assert (
        cli(
            [
                "evaluate",
                str(out),
                "--data",
                str(folders["test"]),
                "--ood",
                str(folders["unlike"]),
                "--json",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert (
        "| balanced accuracy (mean recall) |" in printed
        and "| distribution AUROC (--ood vs --data) |" in printed
    )
    assert json.loads((tmp_path / "r.json").read_text())["images"] == 120
    assert (
        cli(
            [
                "calibrate",
                str(DEMO_BUNDLE),
                "--data",
                str(folders["fit"]),
                "--out",
                str(tmp_path / "c.dermal"),
            ]
        )
        == 0
    )
    assert "| ECE |" in capsys.readouterr().out


@pytest.mark.parametrize("problem", ["missing", "wrong_names", "empty"])
def test_a_bad_data_folder_is_one_clear_line(
    tmp_path: Path, problem: str, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "data"
    if problem == "wrong_names":
        (folder / "melanoma").mkdir(parents=True)
    elif problem == "empty":
        (folder / synth.LABELS[0]).mkdir(parents=True)
    assert (
        cli(["calibrate", str(DEMO_BUNDLE), "--data", str(folder), "--out", str(tmp_path / "o.dermal")]) == 2
    )
    assert "expected" in caplog.text and "Traceback" not in caplog.text
    assert not (tmp_path / "o.dermal").exists()


# --- the assessment in answers, the committed demo, the model card --------------------------------------


def test_the_committed_demo_is_calibrated_on_synthetic_data() -> None:
    loaded = bundle_format.read(DEMO_BUNDLE)
    assert loaded.calibration is not None and loaded.calibration.distribution is not None
    assert loaded.calibration.section["data"]["images"] >= 400


def _post(client: Any, data: bytes, query: str = "") -> dict[str, Any]:
    response = client.post(f"/predict{query}", data=data, content_type="image/png")
    assert response.status_code == 200, response.get_data(as_text=True)[:300]
    body: dict[str, Any] = response.get_json()
    return body


@pytest.fixture(scope="module")
def demo_client() -> Any:
    with hf.client_for(hf.settings_for(DEMO_BUNDLE, max_upload_mb=4.0)) as client:
        yield client


def test_answers_say_in_for_skin_and_out_for_the_rest(demo_client: Any) -> None:
    skin = _post(demo_client, hf.encode(_photos(1, 384)[0], "PNG"))
    assert skin["model"]["calibrated"] is True
    assert skin["assessment"]["distribution"]["status"] == "in"
    assert skin["assessment"]["quality"]["status"] == "ok"
    rng = np.random.default_rng(9)
    for kind in ("text", "noise", "shapes", "pattern"):
        image = unlike.KINDS[kind](rng, 384)
        body = _post(demo_client, hf.encode(image, "PNG"))
        assert body["assessment"]["distribution"]["status"] == "out", (kind, body["assessment"])
        assert body["predictions"]  # said beside the answer, never instead of it


def test_assess_false_skips_the_assessment(demo_client: Any) -> None:
    body = _post(demo_client, hf.encode(_photos(1, 256)[0], "PNG"), "?assess=false")
    assert "assessment" not in body


def test_a_blurry_dark_photo_is_said_to_be_poor(demo_client: Any) -> None:
    photo = ImageEnhance.Brightness(_photos(1, 512)[0].filter(ImageFilter.GaussianBlur(6))).enhance(0.2)
    quality = _post(demo_client, hf.encode(photo, "PNG"))["assessment"]["quality"]
    assert quality["status"] == "poor" and {"blurry", "too_dark"} <= set(quality["issues"])


def test_the_model_card(demo_client: Any) -> None:
    card = demo_client.get("/model").get_json()
    assert card["name"].startswith("synthetic-demo") and card["synthetic"] is True
    assert card["labels"] == list(synth.LABELS) and card["input"]["height"] == 128
    assert card["calibrated"] is True and card["calibration"]["temperature"] > 0
    assert card["evaluation"]["after"]["ece"] <= card["evaluation"]["before"]["ece"]
    assert card["verification"]["max_probability_diff"] <= 1e-4
    assert "Not a medical device" in card["intended_use"]["summary"]
    assert card["source"]["keras_sha256"]


def test_the_model_card_needs_the_key_when_one_is_set() -> None:
    with hf.client_for(hf.settings_for(DEMO_BUNDLE, api_key="k")) as client:
        assert client.get("/model").status_code == 401
        assert client.get("/model", headers={"Authorization": "Bearer k"}).status_code == 200


def test_a_malformed_calibration_section_is_a_bundle_error(tmp_path: Path) -> None:
    from tests.test_bundle import parts, write_raw

    backbone, manifest, arrays = parts(DEMO_BUNDLE)
    manifest["calibration"]["temperature"] = -1
    broken = write_raw(tmp_path / "b.dermal", backbone, manifest, arrays)  # and no calibration.npz
    with pytest.raises(BundleError, match="calibration"):
        bundle_format.read(broken)


def test_quality_and_distribution_cost_little() -> None:
    """Per request: under 5 ms of CPU for the checks on the demo (1.4–1.5 ms here; the benchmark measures
    EfficientNetV2-S). CPU time, not wall time: a busy machine does not make the checks cost more."""
    import time

    loaded = bundle_format.read(DEMO_BUNDLE)
    assert loaded.calibration is not None and loaded.calibration.distribution is not None
    photo = _photos(1, 512)[0]
    feature = np.random.default_rng(0).normal(size=loaded.manifest.feature_map_shape[2])
    started = time.process_time()
    for _ in range(20):
        trust.photo_quality(photo, original_size=photo.size, input_size=(128, 128))
        loaded.calibration.distribution.score(feature)
    assert (time.process_time() - started) / 20 < 0.005
