"""Claim 9's closed-form measurements against hand-computed answers."""

from __future__ import annotations

import numpy as np
import pytest

from bnlab.studies.logistic_conditioning import (
    measure_conditioning,
    raw_and_standardized,
    standardize,
)


def _label_free_cross(a: float, b: float) -> tuple[np.ndarray, np.ndarray]:
    """Points +-a e1, +-b e2, each with label 0 and 1: the optimum is w = 0, b = 0."""
    points = np.array([[a, 0.0], [-a, 0.0], [0.0, b], [0.0, -b]])
    return np.repeat(points, 2, axis=0), np.tile([0.0, 1.0], 4)


def test_hessian_condition_matches_closed_form_at_zero_optimum() -> None:
    a, b, lam = 100.0, 0.1, 1e-3
    X, y = _label_free_cross(a, b)
    result = measure_conditioning(X, y, ["a", "b"], dataset="cross", scaling="raw", lam=lam)
    # H = diag(a^2/8 + lam a^2/2, b^2/8 + lam b^2/2, 1/4) since s(1 - s) = 1/4 at z = 0
    expected = sorted([a**2 / 8 + lam * a**2 / 2, b**2 / 8 + lam * b**2 / 2, 0.25])
    np.testing.assert_allclose(result.hessian_eigenvalues, expected, rtol=1e-9)
    assert result.hessian_condition == pytest.approx(expected[-1] / expected[0], rel=1e-9)
    np.testing.assert_allclose(result.weights, [0.0, 0.0], atol=1e-12)


def test_raw_and_standardized_fits_are_the_same_model() -> None:
    rng = np.random.default_rng(0)
    X = np.c_[0.09 + 0.005 * rng.standard_normal(300), 365 + 150 * rng.standard_normal(300)]
    logits = 2 * (X[:, 0] - 0.09) / 0.005 + 2 * (X[:, 1] - 365) / 150
    y = (rng.random(300) < 1 / (1 + np.exp(-logits))).astype(float)
    raw, std = raw_and_standardized(X, y, ["height", "age"], "mouse", max_steps=2000)
    # the variance-scaled penalty makes the two problems one problem in two coordinate systems
    assert raw.optimal_loss == pytest.approx(std.optimal_loss, rel=1e-9)
    assert raw.hessian_condition > 1e4 * std.hessian_condition
    assert std.gd_steps is not None and raw.gd_steps is None
    assert raw.final_loss > std.final_loss
    assert len(raw.path) > 2 and raw.path[0] == [0.0, 0.0]
    assert np.asarray(std.contour["loss"]).shape == (len(std.contour["w2"]), len(std.contour["w1"]))


def test_standardize_gives_zero_mean_unit_variance_and_keeps_constant_features() -> None:
    X = np.c_[np.arange(10.0) * 1000, np.full(10, 3.0)]
    Z = standardize(X)
    np.testing.assert_allclose(Z[:, 0].mean(), 0.0, atol=1e-12)
    np.testing.assert_allclose(Z[:, 0].std(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(Z[:, 1], 0.0)


def test_rejects_non_binary_labels_and_mismatched_names() -> None:
    with pytest.raises(ValueError, match="binary labels"):
        measure_conditioning(
            np.ones((3, 1)), np.array([0, 1, 2]), ["x"], dataset="d", scaling="raw"
        )
    with pytest.raises(ValueError, match="feature names"):
        measure_conditioning(
            np.ones((3, 2)), np.array([0, 1, 1]), ["x"], dataset="d", scaling="raw"
        )
