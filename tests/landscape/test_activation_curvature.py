"""activation_curvature: g^T H g / ||g||^2 w.r.t. a layer's output, against a closed form."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnlab.landscape import activation_curvature
from bnlab.models import build_model


def _closed_form(model: nn.Module, layer_index: int, x: torch.Tensor, t: torch.Tensor) -> float:
    """For a bias-free linear stack and L = mean((B y - t)^2) over M = N d entries, with y the
    output of layer ``layer_index`` and B the product of the later weights: per sample
    g_n = (2/M) B^T r_n and H = (2/M) B^T B, so the quadratic form is
    (2/M) sum_n ||B g_n||^2 / sum_n ||g_n||^2."""
    weights = [m.weight.detach() for m in model.linear_layers()]
    y = x
    for w in weights[: layer_index + 1]:
        y = y @ w.T
    b = torch.eye(weights[0].shape[0], dtype=x.dtype)
    for w in weights[layer_index + 1 :]:
        b = w @ b
    m = t.numel()
    g = (2.0 / m) * (y @ b.T - t) @ b
    return float((2.0 / m) * ((g @ b.T) ** 2).sum() / (g**2).sum())


@pytest.mark.parametrize("layer_index", [0, 4, 8])
def test_curvature_of_a_linear_network_matches_the_closed_form(layer_index: int) -> None:
    model = build_model("dln", (10,), 10, depth=10, seed=2).double()
    x = torch.randn(64, 10, dtype=torch.float64)
    t = torch.randn(64, 10, dtype=torch.float64)
    name = f"layers.{1 + 2 * layer_index}"  # Flatten, then (Linear, Identity) pairs
    result = activation_curvature(model, nn.functional.mse_loss, (x, t), layers=[name])
    (entry,) = result.layers
    assert entry.layer == name
    assert entry.curvature == pytest.approx(_closed_form(model, layer_index, x, t), rel=1e-9)
    # the last layer's output is the prediction: H = (2/M) I, so the form is exactly 2/M
    last = activation_curvature(model, nn.functional.mse_loss, (x, t), layers=["layers.19"])
    assert last.layers[0].curvature == pytest.approx(2.0 / t.numel(), rel=1e-12)


def test_it_leaves_the_model_as_found_and_names_bad_layers() -> None:
    model = build_model("vgg_digits", (1, 8, 8), 10, norm="noisy_bn", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    batch = (torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)))
    first = activation_curvature(model, nn.functional.cross_entropy, batch)
    again = activation_curvature(model, nn.functional.cross_entropy, batch)
    assert [e.layer for e in first.layers] == ["features.0", "features.4", "classifier.1"]
    assert first.to_dict() == again.to_dict()  # the noise generators were restored
    for key, value in model.state_dict().items():
        if torch.is_tensor(value):
            assert torch.equal(value, before[key]), key
    with pytest.raises(ValueError, match="not modules of the model"):
        activation_curvature(model, nn.functional.cross_entropy, batch, layers=["conv9"])
