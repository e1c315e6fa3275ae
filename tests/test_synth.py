"""Invariants of the synthetic skin-image generator (dermal_fn.demo.synth)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dermal_fn.demo import synth
from dermal_fn.demo.synth import (
    LABELS,
    NO_LESION,
    SPOT_CLASSES,
    Batch,
    generate,
    generate_batch,
    save_folder,
)
from dermal_fn.demo.train import peak_on_spot


@pytest.fixture(scope="module")
def batch() -> Batch:
    return generate_batch(240, seed=7)


def test_labels_are_visual_snake_case_names() -> None:
    assert len(LABELS) == 4
    assert LABELS[NO_LESION] == "no_lesion"
    assert len(set(LABELS)) == len(LABELS)
    for label in LABELS:
        assert re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", label), label
        assert not {"melanoma", "nevus", "naevus", "carcinoma", "benign", "malignant"} & set(label.split("_"))


@pytest.mark.parametrize("label", range(len(LABELS)))
@pytest.mark.parametrize("size", [64, 128])
def test_generate_shapes_and_dtypes(label: int, size: int) -> None:
    sample = generate(np.random.default_rng(0), size=size, label=label)
    assert sample.image.shape == (size, size, 3)
    assert sample.image.dtype == np.uint8
    assert sample.mask.shape == (size, size)
    assert sample.mask.dtype == np.bool_
    assert sample.label == label
    assert isinstance(sample.hair, bool)


def test_generate_is_deterministic_per_seed() -> None:
    first = generate(np.random.default_rng(11))
    second = generate(np.random.default_rng(11))
    other = generate(np.random.default_rng(12))
    assert np.array_equal(first.image, second.image)
    assert np.array_equal(first.mask, second.mask)
    assert (first.label, first.centre, first.hair) == (second.label, second.centre, second.hair)
    assert not np.array_equal(first.image, other.image)


def test_generate_rejects_bad_arguments() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="label"):
        generate(rng, label=len(LABELS))
    with pytest.raises(ValueError, match="label"):
        generate(rng, label=-1)
    with pytest.raises(ValueError, match="size"):
        generate(rng, size=8)


def test_generate_batch_shapes_and_dtypes(batch: Batch) -> None:
    images, labels, masks = batch
    assert images.shape == (240, 128, 128, 3)
    assert images.dtype == np.uint8
    assert labels.shape == (240,)
    assert np.issubdtype(labels.dtype, np.integer)
    assert masks.shape == (240, 128, 128)
    assert masks.dtype == np.bool_


def test_generate_batch_is_deterministic_per_seed(batch: Batch) -> None:
    again = generate_batch(240, seed=7)
    other = generate_batch(240, seed=8)
    for field, same in zip(batch, again, strict=True):
        assert np.array_equal(field, same)
    assert not np.array_equal(batch.images, other.images)


@pytest.mark.parametrize("n", [0, 1, 4, 10, 41])
def test_generate_batch_is_balanced(n: int) -> None:
    labels = generate_batch(n, seed=3, size=32).labels
    counts = Counter(labels.tolist())
    assert sum(counts.values()) == n
    full = [counts.get(label, 0) for label in range(len(LABELS))]
    assert max(full) - min(full) <= 1


def test_generate_batch_of_chosen_classes_is_balanced_over_them() -> None:
    spots = generate_batch(31, seed=2, size=64, classes=SPOT_CLASSES)
    counts = Counter(spots.labels.tolist())
    assert set(counts) == set(SPOT_CLASSES)
    assert max(counts.values()) - min(counts.values()) <= 1
    assert spots.masks.any(axis=(1, 2)).all()


@pytest.mark.parametrize("classes", [[], [len(LABELS)], [-1, 1]])
def test_generate_batch_rejects_unknown_classes(classes: list[int]) -> None:
    with pytest.raises(ValueError, match="class"):
        generate_batch(4, seed=0, size=32, classes=classes)


def test_labels_are_shuffled(batch: Batch) -> None:
    assert not np.array_equal(batch.labels, np.sort(batch.labels))
    assert not np.array_equal(batch.labels, np.arange(240) % len(LABELS))


def test_mask_is_empty_exactly_for_no_lesion(batch: Batch) -> None:
    has_spot = batch.masks.any(axis=(1, 2))
    assert np.array_equal(has_spot, batch.labels != NO_LESION)


def test_centre_is_none_exactly_for_no_lesion_and_lies_on_the_spot() -> None:
    rng = np.random.default_rng(5)
    for index in range(60):
        sample = generate(rng, label=index % len(LABELS))
        if sample.label == NO_LESION:
            assert sample.centre is None
        else:
            assert sample.centre is not None
            assert sample.mask[sample.centre]


def test_spot_lies_fully_inside_the_frame(batch: Batch) -> None:
    margin = 2  # the soft edge of a spot may extend a pixel beyond its mask
    spots = batch.masks[batch.labels != NO_LESION]
    assert not spots[:, :margin].any()
    assert not spots[:, -margin:].any()
    assert not spots[:, :, :margin].any()
    assert not spots[:, :, -margin:].any()


def test_spot_centre_and_extent_come_from_one_range_for_every_class() -> None:
    size = 128
    rng = np.random.default_rng(21)
    for label in SPOT_CLASSES:
        extents = []
        for _ in range(40):
            sample = generate(rng, size=size, label=label)
            assert sample.centre is not None
            row, col = sample.centre
            low, high = (fraction * size for fraction in synth.CENTRE_RANGE)
            assert low - 1 <= row <= high and low - 1 <= col <= high
            spot_rows, spot_cols = np.nonzero(sample.mask)
            extents.append(np.hypot(spot_rows + 0.5 - row, spot_cols + 0.5 - col).max())
        smallest, largest = (fraction * size for fraction in synth.OUTER_RADIUS_RANGE)
        assert max(extents) <= largest + 2, synth.LABELS[label]
        # Every spot class spans small and large spots, not a class-specific size.
        assert min(extents) < smallest + 0.35 * (largest - smallest), synth.LABELS[label]
        assert max(extents) > largest - 0.35 * (largest - smallest), synth.LABELS[label]


@pytest.mark.parametrize("label", range(len(LABELS)))
def test_hair_appears_on_some_but_not_all_images_of_every_class(label: int) -> None:
    rng = np.random.default_rng(100 + label)
    hair = [generate(rng, size=64, label=label).hair for _ in range(60)]
    assert 0.1 < sum(hair) / len(hair) < 0.6


@pytest.mark.parametrize("label", range(len(LABELS)))
def test_hair_only_darkens_pixels_of_the_same_image(label: int) -> None:
    bare = generate(np.random.default_rng(9), label=label, hair=False)
    hairy = generate(np.random.default_rng(9), label=label, hair=True)
    assert bare.hair is False and hairy.hair is True
    assert np.array_equal(bare.mask, hairy.mask)
    assert bare.centre == hairy.centre
    changed = (bare.image != hairy.image).any(axis=-1)
    assert changed.mean() > 0.005
    darker = hairy.image.astype(int).sum(axis=-1) < bare.image.astype(int).sum(axis=-1)
    assert darker[changed].mean() > 0.95


def test_images_look_like_skin(batch: Batch) -> None:
    median_colour = np.median(batch.images.reshape(len(batch.images), -1, 3), axis=1)
    red, green, blue = median_colour.T
    assert np.all(red > green) and np.all(green > blue)
    assert np.ptp(median_colour.mean(axis=1)) > 60  # a range of skin tones, not one
    assert np.all(batch.images.std(axis=(1, 2, 3)) > 2)  # textured, not flat


def test_spot_differs_from_the_skin_around_it(batch: Batch) -> None:
    for image, mask in zip(batch.images, batch.masks, strict=True):
        if not mask.any():
            continue
        skin = image[~mask].astype(float).mean(axis=0)
        spot_distance = np.abs(image[mask].astype(float) - skin).sum(axis=-1)
        assert spot_distance.mean() > 20


@pytest.mark.parametrize(("fmt", "suffix"), [("png", ".png"), ("jpeg", ".jpg")])
def test_save_folder_round_trips_through_pillow(tmp_path: Path, fmt: str, suffix: str) -> None:
    paths = save_folder(tmp_path / "calibration", 9, seed=4, size=64, fmt=fmt)  # type: ignore[arg-type]
    expected = generate_batch(9, seed=4, size=64)
    assert len(paths) == 9
    assert sorted(path.name for path in (tmp_path / "calibration").iterdir()) == [path.name for path in paths]
    for index, path in enumerate(paths):
        label = LABELS[int(expected.labels[index])]
        assert path.name == f"{index:05d}_{label}{suffix}"
        with Image.open(path) as opened:
            assert opened.mode == "RGB"
            pixels = np.asarray(opened)
        assert pixels.shape == (64, 64, 3)
        difference = np.abs(pixels.astype(int) - expected.images[index].astype(int))
        if fmt == "png":
            assert difference.max() == 0
        else:
            assert difference.mean() < 3


def test_save_folder_rejects_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fmt"):
        save_folder(tmp_path, 1, seed=0, fmt="gif")  # type: ignore[arg-type]


def test_peak_on_spot_scores_the_peak_cell_against_the_mask() -> None:
    masks = np.zeros((3, 32, 32), dtype=bool)
    masks[:, 6:11, 6:11] = True  # pixels 6-10: cells (0, 0), (0, 1), (1, 0), (1, 1) of 8x8 px
    grids = np.zeros((3, 4, 4), dtype=np.float32)
    grids[0, 1, 1] = 1.0  # on the spot
    grids[1, 2, 2] = 1.0  # diagonal neighbour of the spot
    grids[2, 3, 0] = 1.0  # two cells away
    assert peak_on_spot(grids, masks).tolist() == [True, False, False]
    assert peak_on_spot(grids, masks, margin_cells=1).tolist() == [True, True, False]
    assert peak_on_spot(grids, masks, margin_cells=2).tolist() == [True, True, True]


def test_peak_on_spot_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="masks"):
        peak_on_spot(np.zeros((2, 4, 4)), np.zeros((2, 30, 30), dtype=bool))
