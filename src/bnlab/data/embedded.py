"""Datasets that ship with bnlab's dependencies or are generated: nothing is downloaded."""

from __future__ import annotations

import numpy as np

from bnlab.data.dataset import Dataset, split


def digits(seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1797 images, 10 classes) as (N, 1, 8, 8) in [0, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]
    return split(
        "digits", x, bunch.target.astype(np.int64), "classification", 10, test_fraction, seed
    )


def cancer(seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's breast-cancer data (569 samples, 30 raw features of very different scales,
    2 classes)."""
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    x = bunch.data.astype(np.float32)
    return split(
        "cancer", x, bunch.target.astype(np.int64), "classification", 2, test_fraction, seed
    )


def mouse(seed: int = 0, test_fraction: float = 0.2, n_samples: int = 1000) -> Dataset:
    """Synthetic mice for the classic unnormalized-inputs example (2 features, 2 classes).

    Height in metres has a tiny variance (mean 0.09, std 0.005), age in days a large one (mean
    365, std 150); the cancer label is drawn with log-odds 2 * z_height + 2 * z_age (z: the
    standardized feature), so both features matter equally although their scales differ by
    four orders of magnitude.
    """
    if n_samples < 2:
        raise ValueError(f"mouse needs n_samples >= 2, got {n_samples}")
    rng = np.random.default_rng(10_000 + seed)
    z = rng.standard_normal((n_samples, 2))
    height = 0.09 + 0.005 * z[:, 0]
    age = 365.0 + 150.0 * z[:, 1]
    logits = 2.0 * z[:, 0] + 2.0 * z[:, 1]
    label = (rng.random(n_samples) < 1.0 / (1.0 + np.exp(-logits))).astype(np.int64)
    x = np.stack([height, age], axis=1).astype(np.float32)
    return split("mouse", x, label, "classification", 2, test_fraction, seed)


def gaussian(
    seed: int = 0,
    test_fraction: float = 0.2,
    n_samples: int = 1000,
    input_dim: int = 10,
    output_dim: int = 10,
    noise: float = 0.0,
) -> Dataset:
    """Synthetic linear regression for the deep linear network: x ~ N(0, I_input_dim),
    y = A x + noise * e with A ~ N(0, 1/input_dim) and e ~ N(0, I_output_dim), all seeded."""
    if n_samples < 2 or input_dim < 1 or output_dim < 1 or noise < 0:
        raise ValueError(
            "gaussian needs n_samples >= 2, input_dim >= 1, output_dim >= 1 and noise >= 0, got "
            f"{n_samples}, {input_dim}, {output_dim}, {noise}"
        )
    rng = np.random.default_rng(20_000 + seed)
    a = rng.standard_normal((output_dim, input_dim)) / np.sqrt(input_dim)
    x = rng.standard_normal((n_samples, input_dim))
    y = x @ a.T + noise * rng.standard_normal((n_samples, output_dim))
    return split(
        "gaussian",
        x.astype(np.float32),
        y.astype(np.float32),
        "regression",
        output_dim,
        test_fraction,
        seed,
    )
