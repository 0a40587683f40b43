"""gradient_bound (Theorem 4.1): the bound holds, and is the exact identity it comes from."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnlab.nn as bnn
from bnlab import landscape as L

CE = nn.functional.cross_entropy


def _cnn(norm, eps):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        norm(4, eps=eps),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        norm(4, eps=eps),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 3),
    ).double()


def _batch():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 2, 5, 5, dtype=torch.float64, generator=gen)
    return x, torch.randint(0, 3, (6,), generator=gen)


def _gamma_scaled(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, bnn.BatchNorm2d)):
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.5, 0.5)
    return model


@pytest.mark.parametrize("norm", [nn.BatchNorm2d, bnn.BatchNorm2d], ids=["torch", "bnlab"])
def test_ratios_are_at_most_one(norm):
    model = _gamma_scaled(_cnn(norm, 1e-2))
    result = L.gradient_bound(model, CE, _batch())
    assert [b.layer for b in result.layers] == ["1", "4"]
    for b in result.layers:
        assert 0 < b.ratio <= 1 + 1e-12
        assert b.channel_ratio_max <= 1 + 1e-12
        assert b.values_per_channel == 6 * 5 * 5
    # eps = 1e-2 is not negligible: the bound is not tight
    assert min(b.ratio for b in result.layers) < 1 - 1e-6


def test_both_sides_equal_the_exact_identity_computed_independently():
    model = _gamma_scaled(_cnn(bnn.BatchNorm2d, 1e-3))
    x, y = _batch()
    # the truth: split the network at the second BN layer and differentiate by hand
    head, bn, tail = model[:4], model[4], model[5:]
    with torch.no_grad():
        inp = head(x)
    inp.requires_grad_(True)
    out = bn(inp)
    loss = CE(tail(out), y)
    dx, dy = torch.autograd.grad(loss, [inp, out])
    dims = [0, 2, 3]
    m = inp.numel() // inp.shape[1]
    mean = inp.detach().mean(dims, keepdim=True)
    var = inp.detach().var(dims, unbiased=False, keepdim=True)
    x_hat = (inp.detach() - mean) / torch.sqrt(var + 1e-3)
    gamma = bn.weight.detach().reshape(1, -1, 1, 1)
    s1, sx = dy.sum(dims, keepdim=True), (dy * x_hat).sum(dims, keepdim=True)
    bound = (gamma**2 / (var + 1e-3)) * ((dy**2).sum(dims, keepdim=True) - s1**2 / m - sx**2 / m)
    delta = 1e-3 / (var + 1e-3)  # ||x_hat||^2 = m (1 - delta)
    exact = (gamma**2 / (var + 1e-3)) * (
        (dy**2).sum(dims, keepdim=True) - s1**2 / m - (1 + delta) * sx**2 / m
    )
    assert torch.allclose((dx**2).sum(dims, keepdim=True), exact, rtol=1e-10)
    model.train()
    result = L.gradient_bound(model, CE, (x, y))
    second = result.layers[1]
    assert second.input_gradient_norm == pytest.approx(float(dx.norm()), rel=1e-10)
    assert second.output_gradient_norm == pytest.approx(float(dy.norm()), rel=1e-10)
    assert second.bound == pytest.approx(float(bound.sum().sqrt()), rel=1e-10)


def test_with_negligible_eps_the_bound_is_an_equality():
    model = _gamma_scaled(_cnn(bnn.BatchNorm2d, 1e-12))
    result = L.gradient_bound(model, CE, _batch())
    for b in result.layers:
        assert b.ratio == pytest.approx(1.0, abs=1e-8)


def test_gradient_bound_needs_a_batch_norm_layer():
    model = nn.Sequential(nn.Linear(3, 2)).double()
    batch = (torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="BatchNorm"):
        L.gradient_bound(model, CE, batch)
