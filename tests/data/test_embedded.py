"""Embedded and synthetic datasets, seeded splits, standardization, the spec parser."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bnlab.data import load_dataset


def _rows(t: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in t.reshape(len(t), -1)}


def test_digits_is_the_sklearn_set_as_images() -> None:
    from sklearn.datasets import load_digits

    data = load_dataset("digits")
    assert data.x_train.shape[1:] == (1, 8, 8) and data.num_outputs == 10
    assert len(data.x_train) + len(data.x_test) == 1797
    everything = torch.cat([data.x_train, data.x_test]).reshape(-1, 64) * 16
    expected = torch.tensor(load_digits().data, dtype=torch.float32)
    assert _rows(everything) == _rows(expected)
    assert 0.0 <= float(data.x_train.min()) and float(data.x_train.max()) <= 1.0


def test_split_is_seeded_disjoint_and_sized() -> None:
    a = load_dataset("cancer", seed=1, test_fraction=0.25)
    b = load_dataset("cancer", seed=1, test_fraction=0.25)
    c = load_dataset("cancer", seed=2, test_fraction=0.25)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, c.x_train)
    assert len(a.x_test) == round(569 * 0.25) and len(a.x_train) == 569 - len(a.x_test)
    assert not _rows(a.x_train) & _rows(a.x_test)


def test_standardize_uses_training_statistics_per_feature() -> None:
    raw = load_dataset("cancer")
    std = load_dataset("cancer", standardize=True)
    x = std.x_train.double()
    torch.testing.assert_close(x.mean(0), torch.zeros(30, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(0), torch.ones(30, dtype=torch.float64), atol=1e-5, rtol=0)
    mean, sd = raw.x_train.double().mean(0), raw.x_train.double().std(0)
    expected = ((raw.x_test.double() - mean) / sd).float()
    torch.testing.assert_close(std.x_test, expected)


def test_standardize_images_per_channel() -> None:
    data = load_dataset("digits", standardize=True)
    assert abs(float(data.x_train.double().mean())) < 1e-6
    assert abs(float(data.x_train.double().std()) - 1) < 1e-3


def test_mouse_height_and_age_differ_in_scale_and_both_matter() -> None:
    data = load_dataset("mouse", n_samples=4000)
    x = torch.cat([data.x_train, data.x_test]).double()
    y = torch.cat([data.y_train, data.y_test]).double()
    height, age = x[:, 0], x[:, 1]
    assert float(age.var()) > 1e8 * float(height.var())
    for feature in (height, age):
        r = float(torch.corrcoef(torch.stack([feature, y]))[0, 1])
        assert r > 0.3  # each feature carries the label on its own


def test_gaussian_targets_are_a_linear_map_of_the_inputs() -> None:
    data = load_dataset("gaussian", n_samples=200, input_dim=5, output_dim=3)
    assert data.task == "regression" and data.y_train.shape == (160, 3)
    x, y = data.x_train.double().numpy(), data.y_train.double().numpy()
    a, *_ = np.linalg.lstsq(x, y, rcond=None)
    assert np.allclose(x @ a, y, atol=1e-5)
    noisy = load_dataset("gaussian", n_samples=200, input_dim=5, output_dim=3, noise=0.5)
    xn, yn = noisy.x_train.double().numpy(), noisy.y_train.double().numpy()
    an, *_ = np.linalg.lstsq(xn, yn, rcond=None)
    # residuals of a 5-parameter fit to 160 samples: std 0.5 * sqrt(1 - 5 / 160) = 0.49
    assert 0.4 < (xn @ an - yn).std() < 0.6


def test_unknown_spec_and_option_errors_list_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown dataset 'svhn'; known datasets: digits, cancer"):
        load_dataset("svhn")
    with pytest.raises(ValueError, match=r"needs a path: mnist:PATH"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="has no option 'dims'; its options: n_samples, input_dim"):
        load_dataset("gaussian", dims=3)
    with pytest.raises(ValueError, match="test_fraction must be in"):
        load_dataset("digits", test_fraction=1.5)
