"""The activation_distribution probe records the activations the training step itself computes
(claim 3 and claim 8 are judged from them), noise draw included."""

from __future__ import annotations

import pytest
import torch

from bnlab.models import build_model
from bnlab.train.loop import _untouched
from bnlab.train.probes import activation_distribution, activation_summary, make_probe


def _forward_output(model: torch.nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    captured = []
    module = dict(model.named_modules())[layer]
    handle = module.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
    try:
        model(x)
    finally:
        handle.remove()
    return captured[0]


def test_the_probe_sees_the_noise_draw_of_the_steps_own_forward() -> None:
    model = build_model("vgg_digits", (1, 8, 8), 10, norm="noisy_bn", seed=0)
    model.train()
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    layer = "features.1"  # the first noisy BN layer
    with _untouched(model):  # what the trainer wraps every probe in
        recorded = activation_distribution(model, (x, y), layers=[layer])["layers"][0]
    step_output = _forward_output(model, layer, x)  # the step's forward, after the probe
    assert recorded == {"layer": layer, **activation_summary(step_output)}
    # the next step draws new noise: a probe that drew its own noise could not have matched
    assert {"layer": layer, **activation_summary(_forward_output(model, layer, x))} != recorded


def test_summary_pools_batch_and_positions_per_channel() -> None:
    out = torch.zeros(4, 2, 3, 3)
    out[:, 1] = 2.0
    summary = activation_summary(out)
    assert summary["channel_means"] == [0.0, 2.0]
    assert summary["channel_stds"] == [0.0, 0.0]
    assert summary["mean"] == 1.0
    assert summary["quantiles"][0] == 0.0 and summary["quantiles"][-1] == 2.0


def test_the_probe_needs_layer_names_that_exist() -> None:
    with pytest.raises(ValueError, match="needs the option layers"):
        make_probe("activation_distribution", 10, {})
    model = build_model("vgg_digits", (1, 8, 8), 10, norm="bn")
    with pytest.raises(ValueError, match="no module named 'conv7'"):
        activation_distribution(model, (torch.randn(4, 1, 8, 8), torch.zeros(4)), layers=["conv7"])
