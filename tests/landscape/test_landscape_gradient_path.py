"""gradient_path against the closed form of a quadratic loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnlab import landscape as L
from landscape.landscape_cases import (
    Quadratic,
    classification_batch,
    mlp,
    quadratic_loss,
    spd_with_spectrum,
)


def _case():
    torch.manual_seed(0)
    model = Quadratic((4, 5))
    a = spd_with_spectrum([6.0, 3.0, 2.0, 1.0, 0.5, 0.3, 0.2, 0.1, -0.5], seed=2)
    c = torch.randn(9, dtype=torch.float64)
    batch = (torch.zeros(1, 1, dtype=torch.float64), c.unsqueeze(0))
    w = torch.cat([p.detach() for p in model.parameters()])
    return model, quadratic_loss(a), batch, a, w - c


def test_default_etas_are_eight_values_from_0_05_to_0_4():
    assert len(L.DEFAULT_ETAS) == 8
    assert torch.allclose(
        torch.tensor(L.DEFAULT_ETAS, dtype=torch.float64),
        torch.linspace(0.05, 0.4, 8, dtype=torch.float64),
        rtol=0,
        atol=1e-15,
    )


def test_losses_gradient_changes_and_smoothness_match_the_quadratic():
    model, loss, batch, a, d = _case()
    result = L.gradient_path(model, loss, batch)
    g = a @ d
    ag = a @ g
    assert result.loss == pytest.approx(float(0.5 * d @ a @ d), rel=1e-12)
    assert result.gradient_norm == pytest.approx(float(g.norm()), rel=1e-12)
    for eta, got_loss, got_diff, got_smooth in zip(
        result.etas, result.losses, result.gradient_differences, result.smoothness, strict=True
    ):
        moved = d - eta * g
        assert got_loss == pytest.approx(float(0.5 * moved @ a @ moved), rel=1e-12)
        # g(w) - g(w - eta g) = eta A g
        assert got_diff == pytest.approx(eta * float(ag.norm()), rel=1e-10)
        assert got_smooth == pytest.approx(float(ag.norm() / g.norm()), rel=1e-10)
    assert result.effective_beta_smoothness == max(result.smoothness)
    assert result.gradient_evaluations == 9


def test_lr_scales_the_step_sizes():
    model, loss, batch, _a, _d = _case()
    scaled = L.gradient_path(model, loss, batch, lr=0.5)
    plain = L.gradient_path(model, loss, batch, etas=[e * 0.5 for e in L.DEFAULT_ETAS])
    assert scaled.etas == pytest.approx(plain.etas, rel=1e-15)
    assert scaled.losses == pytest.approx(plain.losses, rel=1e-14)


def test_cost_is_one_forward_and_backward_per_eta_plus_one():
    model = mlp()
    batch = classification_batch()
    calls = []

    def counting(outputs, targets):
        calls.append(outputs.requires_grad)
        return nn.functional.cross_entropy(outputs, targets)

    L.gradient_path(model, counting, batch, etas=[0.1, 0.2, 0.3])
    assert len(calls) == 4 and all(calls)


def test_gradient_path_rejects_bad_step_sizes():
    model, loss, batch, _, _ = _case()
    with pytest.raises(ValueError, match="eta"):
        L.gradient_path(model, loss, batch, etas=[0.1, 0.0])
    with pytest.raises(ValueError, match="eta"):
        L.gradient_path(model, loss, batch, etas=[-0.1])
    with pytest.raises(ValueError, match="etas"):
        L.gradient_path(model, loss, batch, etas=[])
    with pytest.raises(ValueError, match="lr"):
        L.gradient_path(model, loss, batch, lr=0)
