"""sharpness: the top Hessian eigenvalue of the training loss, warm-started (float64)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from bnlab import landscape as L
from landscape.landscape_cases import (
    Quadratic,
    classification_batch,
    full_hessian,
    mlp,
    quadratic_loss,
    spd_with_spectrum,
)

CE = nn.functional.cross_entropy
SPECTRUM = [9.0, 5.0, 4.5, 3.0, 2.0, 1.5, 1.0, 0.5, 0.25, 0.1, -0.2, -1.0]


def _quadratic(a: torch.Tensor):
    torch.manual_seed(0)
    model = Quadratic((5, 7))
    c = torch.randn(12, dtype=torch.float64)
    return model, quadratic_loss(a), (torch.zeros(1, 1, dtype=torch.float64), c.unsqueeze(0))


def test_sharpness_of_a_quadratic_is_its_largest_eigenvalue():
    model, loss, batch = _quadratic(spd_with_spectrum(SPECTRUM))
    result = L.sharpness(model, loss, batch, tol=1e-8)
    assert result.converged and not result.warm_started
    assert result.sharpness == pytest.approx(9.0, rel=1e-8)
    assert result.residual <= 1e-8 * 9.0
    assert result.stable(lr=2 / 9.0 - 1e-3) and not result.stable(lr=2 / 9.0 + 1e-3)
    data = json.loads(result.to_json())
    assert data["sharpness"] == result.sharpness and "eigenvector" not in data


def test_warm_start_from_the_previous_eigenvector_needs_fewer_products():
    a = spd_with_spectrum(SPECTRUM)
    model, loss, batch = _quadratic(a)
    before = L.sharpness(model, loss, batch, tol=1e-6)
    # The next step's landscape: a slightly different quadratic.
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(12, 12, dtype=torch.float64, generator=gen)
    moved = a + 0.02 * (noise + noise.T)
    truth = float(torch.linalg.eigvalsh(moved)[-1])
    cold = L.sharpness(model, quadratic_loss(moved), batch, tol=1e-6)
    warm = L.sharpness(model, quadratic_loss(moved), batch, tol=1e-6, previous=before)
    assert warm.warm_started
    assert cold.sharpness == pytest.approx(truth, rel=1e-6)
    assert warm.sharpness == pytest.approx(truth, rel=1e-6)
    assert warm.hvp_count < cold.hvp_count
    # the eigenvector itself (a dict or a flat tensor) is accepted too
    flat = torch.cat([before.eigenvector["parts.0"], before.eigenvector["parts.1"]])
    again = L.sharpness(model, quadratic_loss(moved), batch, tol=1e-6, previous=flat)
    assert again.hvp_count == warm.hvp_count and again.sharpness == warm.sharpness


def test_sharpness_over_a_loader_is_that_of_the_size_weighted_average_loss():
    model = mlp()
    x, y = classification_batch(n=30)
    loader = [(x[:10], y[:10]), (x[10:], y[10:])]
    h = (10 * full_hessian(model, CE, loader[0]) + 20 * full_hessian(model, CE, loader[1])) / 30
    result = L.sharpness(model, CE, loader, tol=1e-9)
    assert result.num_batches == 2
    assert result.sharpness == pytest.approx(float(torch.linalg.eigvalsh(h)[-1]), rel=1e-8)


def test_a_previous_vector_that_does_not_fit_is_refused():
    model, loss, batch = _quadratic(spd_with_spectrum(SPECTRUM))
    with pytest.raises(ValueError, match="start has 5 entries"):
        L.sharpness(model, loss, batch, previous=torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="finite, nonzero"):
        L.sharpness(model, loss, batch, previous=torch.zeros(12, dtype=torch.float64))
