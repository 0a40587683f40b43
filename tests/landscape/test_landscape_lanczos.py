"""The Lanczos core on explicit matrices, and the JSON form of the results."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bnlab import landscape as L
from bnlab.landscape.lanczos import quadrature, top_eigenpairs
from landscape.landscape_cases import Quadratic, quadratic_loss, spd_with_spectrum


def test_repeated_eigenvalues_are_found_after_a_breakdown():
    a = torch.diag(torch.tensor([3.0, 3.0, 1.0, 1.0, 1.0, 0.5], dtype=torch.float64))
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(6, dtype=torch.float64, generator=gen)
    found = top_eigenpairs(lambda v: a @ v, start, 3, tol=1e-12, max_iterations=6, generator=gen)
    assert found.eigenvalues == pytest.approx([3.0, 3.0, 1.0], abs=1e-12)
    assert found.converged
    vectors = found.eigenvectors
    assert torch.allclose(vectors.T @ vectors, torch.eye(3, dtype=torch.float64), atol=1e-12)


def test_residuals_are_the_true_residuals_of_the_ritz_pairs():
    a = spd_with_spectrum([float(i) for i in range(1, 41)], seed=4)
    start = torch.ones(40, dtype=torch.float64)
    found = top_eigenpairs(lambda v: a @ v, start, 2, tol=1e-30, max_iterations=8)
    assert not found.converged and found.iterations == 8
    for i in range(2):
        u = found.eigenvectors[:, i]
        true = float((a @ u - found.eigenvalues[i] * u).norm())
        assert found.residuals[i] == pytest.approx(true, rel=1e-6, abs=1e-12)


def test_quadrature_is_exact_for_low_degree_moments():
    a = spd_with_spectrum([5.0, 2.0, 1.0, 0.5, -1.0, 0.1, 3.0, 0.2], seed=6)
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(8, dtype=torch.float64, generator=gen)
    nodes, weights, steps = quadrature(lambda x: a @ x, v, 3)
    assert steps == 3
    unit = v / v.norm()
    for k in range(6):  # exact for degree < 2 * steps
        exact = float(unit @ torch.linalg.matrix_power(a, k) @ unit)
        assert sum(w * t**k for t, w in zip(nodes, weights, strict=True)) == pytest.approx(
            exact, rel=1e-10
        )


def test_results_serialize_to_json_without_tensors():
    torch.manual_seed(0)
    model = Quadratic((4,))
    a = spd_with_spectrum([2.0, 1.0, 0.5, 0.25])
    batch = (torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, 4, dtype=torch.float64))
    loss = quadratic_loss(a)
    eig = L.top_eigenvalues(model, loss, batch, k=2)
    data = json.loads(eig.to_json())
    assert data["eigenvalues"] == eig.eigenvalues and "eigenvectors" not in data
    assert data["hvp_count"] == eig.hvp_count and data["group"] == "all"
    grouped = L.top_eigenvalues(model, loss, batch, groups="layer")
    assert json.loads(L.to_json(grouped))["parts"]["dimension"] == 4
    for result in (
        L.gradient_path(model, loss, batch),
        L.hutchinson_trace(model, loss, batch, samples=3),
        L.spectral_density(model, loss, batch, iterations=3),
        L.curvature_along_gradient(model, loss, batch),
        L.loss_surface(model, loss, batch, [0.0, 1.0]),
    ):
        text = result.to_json()
        assert json.loads(text) == json.loads(json.dumps(result.to_dict()))
    zero_grad = L.curvature_along_gradient(
        model, loss, (batch[0], torch.cat([p.detach() for p in model.parameters()]).unsqueeze(0))
    )
    assert math.isnan(zero_grad.curvature)
    assert json.loads(zero_grad.to_json())["curvature"] == "nan"
