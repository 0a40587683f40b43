"""internal_covariate_shift (Definition 2.1) on a two-layer network, computed by hand."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bnlab import landscape as L


def _net_and_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Tanh(), nn.Linear(4, 2, bias=False))
    model = model.double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(10, 3, dtype=torch.float64, generator=gen)
    y = torch.randn(10, 2, dtype=torch.float64, generator=gen)
    return model, (x, y)


def _grads_by_hand(w1, w2, x, y):
    """L = mean over the 2 * 10 entries of (tanh(x W1^T) W2^T - y)^2; returns dL/dW1, dL/dW2."""
    h = torch.tanh(x @ w1.T)
    out = h @ w2.T
    d_out = 2 * (out - y) / out.numel()
    g2 = d_out.T @ h
    d_pre = (d_out @ w2) * (1 - h**2)
    g1 = d_pre.T @ x
    return g1, g2


def _sgd_warm(model, batch, lr=0.1, momentum=0.9):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    # one real step, so the momentum buffers are non-zero
    nn.functional.mse_loss(model(batch[0]), batch[1]).backward()
    opt.step()
    opt.zero_grad()
    return opt


def test_ics_of_the_second_layer_equals_the_hand_computation_with_momentum_sgd():
    model, (x, y) = _net_and_batch()
    lr, mu = 0.1, 0.9
    opt = _sgd_warm(model, (x, y), lr, mu)
    w1, w2 = model[0].weight.detach().clone(), model[2].weight.detach().clone()
    buf1 = opt.state[model[0].weight]["momentum_buffer"].clone()
    g1, g2 = _grads_by_hand(w1, w2, x, y)
    w1_next = w1 - lr * (mu * buf1 + g1)  # torch's SGD: buf = mu buf + g; w -= lr buf
    _, g2_shifted = _grads_by_hand(w1_next, w2, x, y)
    result = L.internal_covariate_shift(model, nn.functional.mse_loss, (x, y), opt)
    assert [s.layer for s in result.layers] == ["0", "2"]
    first, second = result.layers
    assert first.l2_difference == 0.0 and first.cosine == pytest.approx(1.0)
    assert first.gradient_norm == pytest.approx(float(g1.norm()), rel=1e-12)
    assert second.l2_difference == pytest.approx(float((g2 - g2_shifted).norm()), rel=1e-10)
    cos = float((g2 * g2_shifted).sum() / (g2.norm() * g2_shifted.norm()))
    assert second.cosine == pytest.approx(cos, rel=1e-12)
    assert second.shifted_gradient_norm == pytest.approx(float(g2_shifted.norm()), rel=1e-12)
    assert second.l2_difference > 1e-3  # the earlier layer did move


def test_ics_uses_the_real_update_of_any_optimizer_and_leaves_its_state_alone():
    model, (x, y) = _net_and_batch()
    mse = nn.functional.mse_loss
    opt = torch.optim.Adam(model.parameters(), lr=0.05, weight_decay=0.01)
    for _ in range(2):
        mse(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    # with an LR scheduler attached (it patches the optimizer's step), the probe still leaves
    # the optimizer and the scheduler alone
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    state_before = copy.deepcopy(opt.state_dict())
    # the truth: take the real step on copies, then the gradient of layer 2 at (W1', W2)
    twin, twin_opt = copy.deepcopy((model, opt))
    mse(twin(x), y).backward()
    twin_opt.step()
    w2 = model[2].weight.detach()
    _g1, g2 = _grads_by_hand(model[0].weight.detach(), w2, x, y)
    _, g2_shifted = _grads_by_hand(twin[0].weight.detach(), w2, x, y)
    result = L.internal_covariate_shift(model, mse, (x, y), opt, layers=["2"])
    assert [s.layer for s in result.layers] == ["2"]
    assert result.layers[0].l2_difference == pytest.approx(
        float((g2 - g2_shifted).norm()), rel=1e-9
    )
    state_after = opt.state_dict()
    assert state_after["param_groups"] == state_before["param_groups"]
    assert scheduler.last_epoch == 0
    for key, entry in state_before["state"].items():
        for name, value in entry.items():
            assert torch.equal(
                torch.as_tensor(value), torch.as_tensor(state_after["state"][key][name])
            )
    # and the training step after the probe is the one it would have been without it
    mse(model(x), y).backward()
    opt.step()
    assert torch.equal(model[0].weight, twin[0].weight)


def test_ics_follows_the_forward_order_and_rejects_unknown_layers():
    class Reversed(nn.Module):
        def __init__(self):
            super().__init__()
            self.late = nn.Linear(4, 2)
            self.early = nn.Linear(3, 4)

        def forward(self, x):
            return self.late(torch.tanh(self.early(x)))

    model = Reversed().double()
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randn(5, 2, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    result = L.internal_covariate_shift(model, nn.functional.mse_loss, (x, y), opt)
    assert [s.layer for s in result.layers] == ["early", "late"]
    assert result.layers[0].l2_difference == 0.0
    with pytest.raises(ValueError, match="layers"):
        L.internal_covariate_shift(model, nn.functional.mse_loss, (x, y), opt, layers=["middle"])
