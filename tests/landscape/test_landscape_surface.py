"""loss_surface: closed-form values along given directions, filter normalization, processes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnlab.nn as bnn
from bnlab import landscape as L
from landscape.landscape_cases import (
    Quadratic,
    classification_batch,
    quadratic_loss,
    spd_with_spectrum,
)


def _quadratic():
    torch.manual_seed(0)
    model = Quadratic((3, 3))
    a = spd_with_spectrum([4.0, 2.0, 1.0, 0.5, 0.2, 0.1], seed=1)
    c = torch.randn(6, dtype=torch.float64)
    w = torch.cat([p.detach() for p in model.parameters()])
    return (
        model,
        quadratic_loss(a),
        (torch.zeros(1, 1, dtype=torch.float64), c.unsqueeze(0)),
        a,
        w - c,
    )


def test_one_and_two_dimensional_surfaces_along_given_directions():
    model, loss, batch, a, d = _quadratic()
    gen = torch.Generator().manual_seed(3)
    u = torch.randn(6, dtype=torch.float64, generator=gen)
    v = {"parts.1": torch.randn(3, dtype=torch.float64, generator=gen)}  # parts.0 is zero
    v_flat = torch.cat([torch.zeros(3, dtype=torch.float64), v["parts.1"]])
    alphas, betas = [-1.0, 0.0, 0.5], [-0.5, 2.0]
    line = L.loss_surface(model, loss, batch, alphas, directions=[u])
    for alpha, got in zip(alphas, line.losses, strict=True):
        e = d + alpha * u
        assert got == pytest.approx(float(0.5 * e @ a @ e), rel=1e-12)
    plane = L.loss_surface(model, loss, batch, alphas, betas, directions=[u, v])
    assert plane.direction_kind == "given"
    for alpha, row in zip(alphas, plane.losses, strict=True):
        for beta, got in zip(betas, row, strict=True):
            e = d + alpha * u + beta * v_flat
            assert got == pytest.approx(float(0.5 * e @ a @ e), rel=1e-12)
    assert plane.loss == pytest.approx(float(0.5 * d @ a @ d), rel=1e-12)


def test_top_eigenvectors_can_serve_as_directions():
    model, loss, batch, _a, _d = _quadratic()
    top = L.top_eigenvalues(model, loss, batch, k=1, tol=1e-10)
    surface = L.loss_surface(model, loss, batch, [-1.0, 1.0], directions=top.eigenvectors)
    # L(w + t u) = L(w) + t g.u + t^2 lambda / 2 : the symmetric part isolates the curvature
    curvature = surface.losses[0] + surface.losses[1] - 2 * surface.loss
    assert curvature == pytest.approx(top.eigenvalues[0], rel=1e-10)


def test_random_directions_are_filter_normalized():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), bnn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 3))
    direction = L.filter_normalized_direction(model, seed=5)
    conv = model[0].weight.detach()
    assert torch.allclose(
        direction["0.weight"].flatten(1).norm(dim=1), conv.flatten(1).norm(dim=1), rtol=1e-6
    )
    assert torch.allclose(
        direction["3.weight"].norm(dim=1), model[3].weight.detach().norm(dim=1), rtol=1e-6
    )
    for name in ("0.bias", "1.weight", "1.bias", "3.bias"):
        assert torch.count_nonzero(direction[name]) == 0
    again = L.filter_normalized_direction(model, seed=5)
    assert all(torch.equal(direction[n], again[n]) for n in direction)


def test_several_processes_give_the_same_surface_as_one():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), bnn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    batch = classification_batch()
    ce = nn.functional.cross_entropy
    grid = [-1.0, -0.5, 0.0, 0.5, 1.0]
    one = L.loss_surface(model, ce, batch, grid, grid[:3], seed=1)
    two = L.loss_surface(model, ce, batch, grid, grid[:3], seed=1, processes=2)
    assert one.losses == two.losses
    assert one.direction_kind == "filter_normalized"
    assert one.losses[2][2] == one.loss  # the grid point (0, 0) is w itself


def test_surface_rejects_bad_grids_and_directions():
    model, loss, batch, _, _ = _quadratic()
    with pytest.raises(ValueError, match="alphas"):
        L.loss_surface(model, loss, batch, [])
    with pytest.raises(ValueError, match="directions"):
        L.loss_surface(model, loss, batch, [0.0], [1.0], directions=[torch.zeros(6)])
    with pytest.raises(ValueError, match="directions"):
        L.loss_surface(model, loss, batch, [0.0], directions=[{"nope": torch.zeros(3)}])
    with pytest.raises(ValueError, match="processes"):
        L.loss_surface(model, loss, batch, [0.0], processes=0)
    with pytest.raises(ValueError, match="picklable"):  # quadratic_loss returns a closure
        L.loss_surface(model, loss, batch, [0.0, 1.0], processes=2)
