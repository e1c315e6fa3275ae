"""The explanation and fairness audit: its numbers against known answers, and ``evaluate`` on the demo.

Oracles: Spearman against the textbook formula without ties; CIELAB against published values of
the sRGB primaries; ITA bands at their cut points; deletion/insertion curves on a model-free toy
whose answer is known. Then ``evaluate`` on the demo bundle: Grad-CAM beats random maps on both
curves, re-drawing the head's weights drops the maps' rank correlation below 0.5, and every
skin-tone band is reported, thin ones marked. The HTML page is checked in Chromium.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from dermal_fn.core import audit
from dermal_fn.demo import synth
from dermal_fn.models import DEMO_BUNDLE


def test_spearman_is_the_textbook_formula_without_ties() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.permutation(40).astype(float), rng.permutation(40).astype(float)
    d = audit.ranks(a) - audit.ranks(b)
    assert audit.spearman(a, b) == pytest.approx(1 - 6 * float(d @ d) / (40 * (40**2 - 1)))
    assert audit.spearman(a, a) == pytest.approx(1.0) and audit.spearman(a, -a) == pytest.approx(-1.0)
    assert audit.spearman(np.ones(5), a[:5]) == 0.0


def test_ties_get_their_average_rank() -> None:
    assert audit.ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


@pytest.mark.parametrize(
    ("rgb", "lab"),
    [
        ((255, 255, 255), (100.0, 0.0, 0.0)),
        ((255, 0, 0), (53.24, 80.09, 67.20)),
        ((0, 0, 255), (32.30, 79.19, -107.86)),
    ],
)
def test_cielab_of_the_srgb_primaries(rgb: tuple[int, int, int], lab: tuple[float, float, float]) -> None:
    np.testing.assert_allclose(audit.srgb_to_lab(np.array(rgb)), lab, atol=0.05)


@pytest.mark.parametrize(
    ("angle", "band"),
    [
        (70.0, "very_light"),
        (55.0, "light"),
        (41.0, "intermediate"),
        (28.0, "tan"),
        (19.0, "brown"),
        (10.0, "dark"),
        (-40.0, "dark"),
    ],
)
def test_ita_bands_at_their_cut_points(angle: float, band: str) -> None:
    assert audit.ita_band(angle) == band


def test_ita_orders_the_demo_generators_skin_from_light_to_dark() -> None:
    angles = []
    for position in (0.0, 2.5, 5.0):
        sample = synth.generate(
            np.random.default_rng(1), size=96, label=synth.NO_LESION, hair=False, tones=(position, position)
        )
        angles.append(audit.ita(audit.skin_pixels(sample.image)))
    assert angles[0] > 55 > angles[1] > 10 > angles[2]


def test_deletion_of_the_right_cells_kills_the_score_first() -> None:
    """A toy 'model' whose score is the mean of the top-left quarter: a map on that quarter is faithful."""
    image = np.ones((1, 8, 8, 3), dtype=np.float32)

    def score(x: np.ndarray) -> float:
        return float(x[:4, :4].mean())

    right, wrong = np.zeros((4, 4)), np.zeros((4, 4))
    right[:2, :2] = 1.0
    wrong[2:, 2:] = 1.0
    fill = np.zeros_like(image)
    for saliency, expected in ((right, "fast"), (wrong, "slow")):
        steps = audit.occlusion_steps(image, fill, saliency, steps=4, insertion=False)
        assert steps.shape == (5, 8, 8, 3) and np.array_equal(steps[0], image[0]) and not steps[-1].any()
        curve = [score(x) for x in steps]
        assert (curve[1] == 0.0) is (expected == "fast")
    insertion = audit.occlusion_steps(image, fill, right, steps=4, insertion=True)
    assert not insertion[0].any() and np.array_equal(insertion[-1], image[0])
    assert audit.curve_auc(np.array([1.0, 0.0, 0.0])) == pytest.approx(0.25)


# --- evaluate on the demo bundle ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    from dermal_fn.tools.evaluate import evaluate

    folder = tmp_path_factory.mktemp("audit")
    synth.save_labelled(folder / "data", 240, seed=31)
    html = folder / "report.html"
    report = evaluate(DEMO_BUNDLE, folder / "data", audit_images=30, html=html, progress=None)
    return report, html


def test_grad_cam_beats_random_maps_on_both_curves(demo_report: tuple[dict[str, Any], Path]) -> None:
    explanations = demo_report[0]["explanations"]
    random = explanations["baselines"]["random"]
    assert explanations["images"] == 30
    assert explanations["deletion_auc"] < random["deletion_auc"] - 0.2
    assert explanations["insertion_auc"] > random["insertion_auc"] + 0.05
    assert explanations["beats_random"] is True
    assert set(explanations["baselines"]) == {"random", "centre"}


def test_re_drawing_the_head_changes_the_maps(demo_report: tuple[dict[str, Any], Path]) -> None:
    assert demo_report[0]["explanations"]["randomization"]["spearman"] < 0.5


def test_every_skin_tone_band_is_reported_and_thin_ones_are_marked(
    demo_report: tuple[dict[str, Any], Path],
) -> None:
    skin = demo_report[0]["skin_tone"]
    groups = {g["group"]: g for g in skin["groups"]}
    assert list(groups) == [name for name, _, _ in audit.ITA_BANDS]
    assert sum(g["images"] for g in groups.values()) == demo_report[0]["images"]
    for group in groups.values():
        assert group["enough"] is (group["images"] >= skin["min_images"])
        assert set(group) >= {
            "group",
            "ita_range",
            "images",
            "balanced_accuracy",
            "ece",
            "abstentions",
            "flagged_out",
            "flagged_too_dark",
        }
    gap = skin["equity_gap"]
    assert gap["balanced_accuracy"] is not None and 0.0 <= gap["balanced_accuracy"] <= 1.0
    json.dumps(demo_report[0], allow_nan=False)  # plain JSON all the way down


@pytest.mark.browser
def test_the_html_report_is_one_self_contained_page(
    demo_report: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    from tests.test_page import CHROMIUM, CHROMIUM_ARGS

    html = demo_report[1]
    text = html.read_text()
    assert "<script" not in text and "http://" not in text and "https://" not in text
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        problems: list[str] = []
        page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
        page.on(
            "request",
            lambda request: (
                problems.append(request.url) if not request.url.startswith(("file:", "data:")) else None
            ),
        )
        page.goto(html.as_uri())
        assert page.locator("svg").count() >= 5
        assert page.locator("text=Skin tone").count() >= 1
        shot = Path(__file__).resolve().parent.parent / "artifacts" / "screenshots" / "audit-report.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert problems == []
    assert math.isfinite(demo_report[0]["ece"])


@pytest.mark.tensorflow
@pytest.mark.slow
def test_the_audit_finds_the_gap_of_a_model_trained_on_light_skin_only(tmp_path: Path) -> None:
    """The demo CNN trained on very light and light skin only (the generator's tones 0-1.2 of 0-5), then
    evaluated on every tone: the skin-tone table must show it failing on the skin it never saw."""
    from dermal_fn.demo.train import train
    from dermal_fn.keras.export import export_keras
    from dermal_fn.tools.evaluate import evaluate

    keras_path = train(tmp_path / "light", size=64, epochs=4, n_train=480, n_validation=32, tones=(0.0, 1.2))
    bundle = tmp_path / "light.dermal"
    export_keras(keras_path, bundle, labels=keras_path.with_name("labels.txt"))
    synth.save_labelled(tmp_path / "all-tones", 360, seed=77)
    skin = evaluate(bundle, tmp_path / "all-tones", audit_images=0, progress=None)["skin_tone"]
    groups = {g["group"]: g for g in skin["groups"]}
    gap = skin["equity_gap"]
    assert gap["best"] in ("very_light", "light") and gap["worst"] not in ("very_light", "light")
    assert gap["balanced_accuracy"] >= 0.2
    assert groups["very_light"]["balanced_accuracy"] > groups["dark"]["balanced_accuracy"] + 0.2


def audited_demo(folder: Path, *, audit_images: int = 5) -> Path:
    """The demo bundle audited on 60 generated photos and written with its audit (evaluate --write)."""
    from dermal_fn.tools.cli import main

    synth.save_labelled(folder / "data", 60, seed=5)
    out = folder / "audited.dermal"
    argv = ["evaluate", str(DEMO_BUNDLE), "--data", str(folder / "data"), "--audit-images", str(audit_images)]
    assert main([*argv, "--write", str(out)]) == 0
    return out


def test_evaluate_write_puts_the_audit_in_the_model_card(tmp_path: Path) -> None:
    from dermal_fn.serving.card import model_card
    from dermal_fn.serving.engines import load_engine

    out = audited_demo(tmp_path)
    card = model_card(load_engine(out, sha256="audited"))
    audit_section = cast(dict[str, Any], card["audit"])
    assert audit_section is not None and audit_section["images"] == 60
    assert {g["group"] for g in audit_section["skin_tone"]["groups"]} == {
        name for name, _, _ in audit.ITA_BANDS
    }
    assert "curves" not in audit_section["explanations"] and "deletion_auc" in audit_section["explanations"]
    assert card["calibrated"] is True  # the copy keeps the demo's calibration
