"""effective_learning_rates: scale invariance of the weights before a normalization (float64)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import bnlab.nn as bnn
from bnlab import landscape as L
from landscape.landscape_cases import classification_batch, mlp

CE = nn.functional.cross_entropy


def _linear_bn(norm: nn.Module | None = None) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 6), norm or bnn.BatchNorm1d(6, eps=1e-30), nn.Linear(6, 3)
    ).double()


# eps ~ 0: the normalization's eps breaks the invariance by O(eps / variance).
@pytest.mark.parametrize(
    "norm",
    [bnn.BatchNorm1d(6, eps=1e-30), nn.BatchNorm1d(6, eps=1e-30), nn.LayerNorm(6, eps=1e-30)],
    ids=["bnlab", "torch", "layernorm"],
)
def test_weights_before_a_normalization_are_scale_invariant_with_their_closed_forms(norm):
    model = _linear_bn(norm)
    batch = classification_batch()
    result = L.effective_learning_rates(model, CE, batch, lr=0.1)
    assert [s.layer for s in result.layers] == ["0"]  # the classifier feeds no normalization
    layer = result.layers[0]
    assert layer.normalized_by == "1" and layer.parameters == ["0.weight", "0.bias"]
    w = torch.cat([model[0].weight.detach().reshape(-1), model[0].bias.detach()])
    assert layer.norm == pytest.approx(float(w.norm()), rel=1e-14)
    assert layer.effective_lr == pytest.approx(0.1 / float(w @ w), rel=1e-14)
    assert layer.scale_invariant and abs(layer.cosine) < 1e-12
    # the gradient w.r.t. c w is g / c: the loss does not see the scale
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled[0].weight.mul_(3.0)
        scaled[0].bias.mul_(3.0)
    again = L.effective_learning_rates(scaled, CE, batch, lr=0.1).layers[0]
    assert again.gradient_norm == pytest.approx(layer.gradient_norm / 3, rel=1e-10)
    assert again.effective_lr == pytest.approx(layer.effective_lr / 9, rel=1e-12)


def test_angular_update_of_an_sgd_step_is_atan_of_lr_grad_over_norm():
    model = _linear_bn()
    batch = classification_batch()
    lr = 0.5
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    predicted = L.effective_learning_rates(model, CE, batch, lr=lr).layers[0]
    assert predicted.angular_update is None
    model.train()
    CE(model(batch[0]), batch[1]).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
    after = L.effective_learning_rates(model, CE, batch, lr=lr, previous=before).layers[0]
    # g is orthogonal to w, so the step turns w by exactly atan(lr ||g|| / ||w||)
    assert after.angular_update == pytest.approx(predicted.predicted_angular_update, rel=1e-10)
    assert after.norm == pytest.approx(math.hypot(predicted.norm, lr * predicted.gradient_norm))


def test_without_normalization_or_in_eval_mode_the_check_fails():
    model = mlp()
    batch = classification_batch()
    assert L.effective_learning_rates(model, CE, batch, lr=0.1).layers == []
    layer = L.effective_learning_rates(model, CE, batch, lr=0.1, layers=["0"]).layers[0]
    assert layer.normalized_by is None
    assert not layer.scale_invariant and abs(layer.cosine) > 1e-3
    # BN with running statistics is an affine map: no scale invariance
    bn = _linear_bn()
    with torch.no_grad():
        bn[1].running_var.fill_(2.0)
    evaluated = L.effective_learning_rates(bn, CE, batch, lr=0.1, mode="eval").layers[0]
    assert not evaluated.scale_invariant


def test_eps_breaks_the_invariance_slightly():
    cosine = (
        L.effective_learning_rates(
            _linear_bn(bnn.BatchNorm1d(6, eps=1e-2)), CE, classification_batch(), lr=0.1
        )
        .layers[0]
        .cosine
    )
    assert 1e-6 < abs(cosine) < 1e-1


def test_a_layer_after_an_activation_is_not_listed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), bnn.BatchNorm1d(6), nn.Linear(6, 3))
    assert L.effective_learning_rates(model.double(), CE, classification_batch(), lr=1).layers == []


def test_bad_arguments_are_refused():
    model = _linear_bn()
    batch = classification_batch()
    with pytest.raises(ValueError, match="lr must be positive"):
        L.effective_learning_rates(model, CE, batch, lr=0.0)
    with pytest.raises(ValueError, match="'5' is not a module with trainable parameters"):
        L.effective_learning_rates(model, CE, batch, lr=0.1, layers=["5"])
    with pytest.raises(ValueError, match="previous must hold"):
        L.effective_learning_rates(model, CE, batch, lr=0.1, previous={})
