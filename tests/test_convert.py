"""convert_norm on a torchvision-free model zoo of our own."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnlab.nn as bnn


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(out)))


def sequential_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), bnn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )  # fmt: skip


def residual_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), ResidualBlock(8),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )  # fmt: skip


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(48, 32), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Linear(32, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10),
    )  # fmt: skip


ZOO = {"cnn": (sequential_cnn, 2), "resnet": (residual_net, 3), "mlp": (mlp, 2)}
EXPECTED_CLASS = {
    "bn": bnn.BatchNorm,
    "noisy_bn": bnn.NoisyBatchNorm,
    "l1": bnn.LpBatchNorm,
    "l2": bnn.LpBatchNorm,
    "linf": bnn.LpBatchNorm,
    "ghost": bnn.GhostBatchNorm,
    "renorm": bnn.BatchRenorm,
    "layer": bnn.LayerNorm,
    "group": bnn.GroupNorm,
}


def _norm_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if bnn.is_norm_layer(m)]


@pytest.mark.parametrize("kind", bnn.NORM_KINDS)
@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_norm_layer_is_swapped_and_the_model_trains(name, kind):
    factory, count = ZOO[name]
    torch.manual_seed(0)
    model = factory()
    assert len(_norm_layers(model)) == count
    for m in _norm_layers(model):
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
    old_weights = [m.weight.detach().clone() for m in _norm_layers(model)]
    converted = bnn.convert_norm(model, kind)
    assert converted is model
    layers = _norm_layers(model)
    if kind == "none":
        assert layers == []
        assert sum(isinstance(m, nn.Identity) for m in model.modules()) == count
    else:
        assert len(layers) == count
        assert all(isinstance(m, EXPECTED_CLASS[kind]) for m in layers)
        assert not any(type(m).__module__.startswith("torch.") for m in layers)
        for layer, weight in zip(layers, old_weights, strict=True):
            assert torch.equal(layer.weight, weight)
    x = torch.randn(4, 3, 4, 4)
    loss = model(x).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_running_statistics_carry_over_where_they_mean_the_same():
    source = nn.BatchNorm2d(4)
    source(torch.randn(8, 4, 3, 3) * 3 + 2)
    for kind in ("bn", "noisy_bn", "ghost", "renorm", "l1"):
        layer = bnn.convert_norm(nn.Sequential(source), kind)[0]
        assert torch.equal(layer.running_mean, source.running_mean)
        assert layer.num_batches_tracked.item() == 1
        if kind != "l1":
            assert torch.equal(layer.running_var, source.running_var)
        else:  # lp layers track their divisor, which running_var does not determine
            assert torch.equal(layer.running_scale, torch.ones(4))


def test_options_and_settings_reach_the_new_layers():
    model = nn.Sequential(nn.BatchNorm1d(3, eps=1e-3, momentum=None, affine=False))
    layer = bnn.convert_norm(model, "ghost", virtual_batch_size=5)[0]
    assert isinstance(layer, bnn.GhostBatchNorm1d)
    assert (layer.eps, layer.momentum, layer.affine, layer.virtual_batch_size) == (
        1e-3,
        None,
        False,
        5,
    )
    l1 = bnn.convert_norm(nn.Sequential(nn.BatchNorm3d(2)), "l1")[0]
    assert isinstance(l1, bnn.LpBatchNorm3d) and l1.p == 1


def test_eval_flag_and_dtype_are_kept():
    model = nn.Sequential(nn.BatchNorm2d(3, dtype=torch.float64)).eval()
    layer = bnn.convert_norm(model, "linf")[0]
    assert not layer.training and layer.weight.dtype == torch.float64


def test_a_norm_layer_itself_is_converted():
    assert isinstance(bnn.convert_norm(nn.BatchNorm2d(3), "renorm"), bnn.BatchRenorm2d)
    assert isinstance(bnn.convert_norm(nn.SyncBatchNorm(3), "l2"), bnn.LpBatchNorm)


def test_unknown_kind_lists_the_known_ones():
    with pytest.raises(
        ValueError, match="unknown norm kind 'instance'; known kinds: none, bn, noisy_bn"
    ):
        bnn.convert_norm(mlp(), "instance")


@pytest.mark.parametrize("kind", ["bn", "l1", "noisy_bn"])
def test_affine_without_bias_converts_to_a_layer_without_bias(kind):
    source = nn.BatchNorm2d(3, bias=False)
    with torch.no_grad():
        source.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
    layer = bnn.convert_norm(source, kind)
    assert layer.bias is None and torch.equal(layer.weight, source.weight)
    back = bnn.convert_norm(nn.Sequential(nn.BatchNorm1d(3, affine=False)), kind)[0]
    assert back.weight is None and back.bias is None
