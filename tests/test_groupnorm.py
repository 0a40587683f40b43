"""The per-sample kinds "layer" and "group": torch.nn's semantics, a float64 reference, and
every place a kind is named (convert_norm, the models, the training configs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import bnlab.nn as bnn
from bnlab.functional import reference as R
from bnlab.train.config import ConfigError, TrainConfig, validate
from helpers import TOL, rel_err


def _group_norm_reference(x, groups, gamma, beta, eps):
    """Each sample's groups normalized over their values: BatchNorm's reference on the
    transposed (values, sample x group) array, whose columns are then the 'channels'."""
    n, c = x.shape[:2]
    columns = x.reshape(n * groups, -1).T
    x_hat, _ = R.batch_norm_forward(columns, np.ones(n * groups), np.zeros(n * groups), eps)
    x_hat = x_hat.T.reshape(x.shape)
    view = (1, c) + (1,) * (x.ndim - 2)
    return x_hat * gamma.reshape(view) + beta.reshape(view)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("kind", "shape", "groups"),
    [("group", (4, 8, 3, 3), 4), ("group", (3, 6, 5), 3), ("layer", (4, 6, 3, 3), 1),
     ("layer", (5, 7), 1), ("group", (2, 4, 2, 2, 2), 2)],
)  # fmt: skip
def test_matches_the_float64_reference_in_train_and_eval(kind, shape, groups, dtype):
    rng = np.random.default_rng(0)
    c = shape[1]
    x = rng.normal(3.0, 2.0, size=shape)
    gamma, beta = rng.uniform(0.5, 2, size=c), rng.normal(size=c)
    options = {"num_groups": groups} if kind == "group" else {}
    layer = bnn.norm_layer(kind, c, len(shape) - 2 or 1, dtype=dtype, **options)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(gamma))
        layer.bias.copy_(torch.from_numpy(beta))
    want = _group_norm_reference(x, groups, gamma, beta, layer.eps)
    xt = torch.from_numpy(x).to(dtype)
    assert rel_err(layer(xt), want) <= TOL[dtype]
    layer.eval()  # per-sample statistics: eval is training's computation
    assert rel_err(layer(xt), want) <= TOL[dtype]


def test_layer_norm_on_features_is_torch_layer_norm():
    ours, theirs = bnn.LayerNorm(7, dtype=torch.float64), nn.LayerNorm(7, dtype=torch.float64)
    with torch.no_grad():
        for layer in (ours, theirs):
            layer.weight.copy_(torch.linspace(0.5, 1.5, 7))
            layer.bias.copy_(torch.linspace(-1, 1, 7))
    x = torch.randn(5, 7, dtype=torch.float64) * 3 + 1
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn(5, 7, dtype=torch.float64)
    ours(xa).backward(dy)
    theirs(xb).backward(dy)
    assert rel_err(ours(x), theirs(x)) <= 1e-12
    assert rel_err(xa.grad, xb.grad) <= 1e-12
    assert rel_err(ours.weight.grad, theirs.weight.grad) <= 1e-12
    assert rel_err(ours.bias.grad, theirs.bias.grad) <= 1e-12


def test_group_norm_state_and_defaults_follow_torch():
    layer = bnn.GroupNorm(64)
    assert layer.num_groups == 32 and layer.num_features == 64  # Wu & He's 32 groups
    assert bnn.GroupNorm(12).num_groups == 4  # gcd(32, 12)
    theirs = nn.GroupNorm(32, 64)
    assert layer.state_dict().keys() == theirs.state_dict().keys()  # no running statistics
    layer.load_state_dict(theirs.state_dict())
    assert bnn.GroupNorm(8, bias=False).bias is None


def test_bad_groups_and_channels_are_refused_by_name():
    with pytest.raises(ValueError, match="GroupNorm: num_groups must divide num_features = 6"):
        bnn.GroupNorm(6, num_groups=4)
    with pytest.raises(
        ValueError, match=r"LayerNorm expects an input of shape \(N, 4, \*\), got \(2, 3, 5\)"
    ):
        bnn.LayerNorm(4)(torch.randn(2, 3, 5))


@pytest.mark.parametrize("kind", ["layer", "group"])
def test_convert_norm_swaps_batch_norm_for_the_kind_and_back(kind):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten())
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    weight = model[1].weight.detach().clone()
    bnn.convert_norm(model, kind, eps=1e-3)
    assert type(model[1]) is bnn.variant(kind).classes[2]
    assert torch.equal(model[1].weight, weight) and model[1].eps == 1e-3
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    bnn.convert_norm(model, "bn")
    assert isinstance(model[1], bnn.BatchNorm) and torch.equal(model[1].weight, weight)
    assert model[1].momentum == 0.1 and model[1].track_running_stats


@pytest.mark.parametrize("kind", ["layer", "group"])
def test_training_configs_accept_the_kind(kind):
    config = TrainConfig()
    config.model.norm = kind
    validate(config)
    config.model.norm = "instance"
    with pytest.raises(ConfigError, match=r"model\.norm"):
        validate(config)
