"""The NumPy head's backward pass against central finite differences, op by op and end to end."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from dermal_fn.core.gradcam import grad_cam, normalise
from dermal_fn.core.head import Head, Op

RNG = np.random.default_rng(7)


def numeric_gradient(f: Callable[[np.ndarray], float], x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    grad = np.zeros_like(x)
    flat = x.reshape(-1)
    g = grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        up = f(x)
        flat[i] = old - eps
        down = f(x)
        flat[i] = old
        g[i] = (up - down) / (2 * eps)
    return grad


def dense(n_in: int, n_out: int, activation: str = "linear", **params: float) -> Op:
    arrays = {"kernel": RNG.normal(0, 0.5, (n_in, n_out)), "bias": RNG.normal(0, 0.1, n_out)}
    return Op("dense", f"dense_{n_out}", {"activation": activation, **params}, arrays)


C = 6
HEADS = {
    "gap_dense": [Op("global_average_pool", "gap"), dense(C, 4)],
    "gmp_dense": [Op("global_max_pool", "gmp"), dense(C, 4)],
    "flatten_dense": [Op("flatten", "flat"), dense(3 * 3 * C, 4)],
    "relu_head": [Op("global_average_pool", "gap"), Op("identity", "drop"), dense(C, 5, "relu"), dense(5, 4)],
    "gelu_layernorm": [
        Op("global_average_pool", "gap"),
        dense(C, 8, "gelu"),
        Op(
            "layer_norm",
            "ln",
            {"epsilon": 1e-3},
            {"gamma": RNG.normal(1, 0.2, 8), "beta": RNG.normal(0, 0.2, 8)},
        ),
        dense(8, 4),
    ],
    "gelu_tanh_approx": [
        Op("global_average_pool", "gap"),
        dense(C, 8, "gelu", approximate=True),
        dense(8, 4),
    ],
    "bn_swish_4d": [
        Op("affine", "bn", {}, {"scale": RNG.normal(1, 0.3, C), "offset": RNG.normal(0, 0.3, C)}),
        Op("activation", "act", {"activation": "silu"}),
        Op("global_average_pool", "gap"),
        dense(C, 4),
    ],
    "tanh_sigmoid_elu": [
        Op("global_average_pool", "gap"),
        dense(C, 7, "tanh"),
        dense(7, 7, "elu"),
        Op("activation", "sig", {"activation": "sigmoid"}),
        dense(7, 4),
    ],
    "softmax_inside": [
        Op("global_average_pool", "gap"),
        dense(C, 5),
        Op("activation", "sm", {"activation": "softmax"}),
        dense(5, 4),
    ],
}


@pytest.mark.parametrize("name", sorted(HEADS))
@pytest.mark.parametrize("output", ["softmax", "sigmoid", "none"])
@pytest.mark.parametrize("score", ["logit", "probability"])
def test_backward_matches_finite_differences(name: str, output: str, score: str) -> None:
    head = Head(ops=tuple(HEADS[name]), output_activation=output, binary=False)  # type: ignore[arg-type]
    feature_map = RNG.normal(0.5, 1.0, (1, 3, 3, C))
    for class_index in (0, 3):
        result = head.forward(feature_map)
        analytic = head.backward(result, head.score_gradient(result, class_index=class_index, score=score))  # type: ignore[arg-type]

        def f(x: np.ndarray, class_index: int = class_index) -> float:
            return head.class_score(head.forward(x), class_index=class_index, score=score)  # type: ignore[arg-type]

        numeric = numeric_gradient(f, feature_map.copy())
        np.testing.assert_allclose(analytic, numeric, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("score", ["logit", "probability"])
def test_binary_head_reports_two_classes(score: str) -> None:
    head = Head(ops=(Op("global_average_pool", "gap"), dense(C, 1)), output_activation="sigmoid", binary=True)
    assert head.n_classes == 2
    feature_map = RNG.normal(0, 1, (1, 4, 4, C))
    result = head.forward(feature_map)
    assert result.probabilities.shape == (2,)
    assert result.probabilities.sum() == pytest.approx(1.0)
    for class_index in (0, 1):
        analytic = head.backward(result, head.score_gradient(result, class_index=class_index, score=score))  # type: ignore[arg-type]

        def class_score(x: np.ndarray, c: int = class_index) -> float:
            return head.class_score(head.forward(x), class_index=c, score=score)  # type: ignore[arg-type]

        numeric = numeric_gradient(class_score, feature_map.copy())
        np.testing.assert_allclose(analytic, numeric, rtol=1e-4, atol=1e-8)


def test_gmp_gradient_splits_ties_evenly() -> None:
    head = Head(ops=(Op("global_max_pool", "gmp"), dense(1, 2)), output_activation="softmax", binary=False)
    feature_map = np.zeros((1, 2, 2, 1))
    feature_map[0, 0, 0, 0] = feature_map[0, 1, 1, 0] = 3.0
    result = head.forward(feature_map)
    grad = head.backward(result, np.array([1.0, 0.0]))
    kernel = head.ops[1].arrays["kernel"][0, 0]
    assert grad[0, 0, 0, 0] == pytest.approx(kernel / 2)
    assert grad[0, 1, 1, 0] == pytest.approx(kernel / 2)
    assert grad[0, 0, 1, 0] == 0.0


def test_spec_round_trip_gives_the_same_numbers() -> None:
    head = Head(ops=tuple(HEADS["gelu_layernorm"]), output_activation="softmax", binary=False)
    spec, arrays = head.to_spec()
    again = Head.from_spec(spec, arrays)
    feature_map = RNG.normal(0, 1, (1, 3, 3, C))
    np.testing.assert_allclose(
        again.forward(feature_map).probabilities, head.forward(feature_map).probabilities, atol=1e-6
    )


def test_normalise_never_nan_and_zero_stays_zero() -> None:
    assert not normalise(np.full((3, 3), -1.0)).any()
    assert not normalise(np.zeros((2, 2))).any()
    assert not np.isnan(normalise(np.array([[np.nan, 1.0]]))).any()
    grid = normalise(np.array([[0.5, 2.0], [-1.0, 1.0]]))
    assert grid.max() == 1.0
    assert grid.min() == 0.0


def test_grad_cam_shape_range_and_no_mutation() -> None:
    feature_map = RNG.normal(0, 1, (1, 5, 7, C)).astype(np.float32)
    gradient = RNG.normal(0, 1, (1, 5, 7, C))
    before = feature_map.copy()
    grid = grad_cam(feature_map, gradient)
    assert grid.shape == (5, 7)
    assert np.isfinite(grid).all()
    assert grid.min() >= 0.0 and grid.max() <= 1.0
    np.testing.assert_array_equal(feature_map, before)
