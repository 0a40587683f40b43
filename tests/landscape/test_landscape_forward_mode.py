"""hvp(method="forward") (jvp of grad) equals the double-backward HVP through train-mode BN.

PyTorch has had a report of a wrong nested forward-mode second derivative of F.batch_norm in
training mode; these tests hold bnlab's forward-over-reverse products to the reverse ones.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnlab.nn as bnn
from bnlab import landscape as L

CE = nn.functional.cross_entropy
NORMS = {
    "bnlab": (bnn.BatchNorm1d, bnn.BatchNorm2d),
    "torch": (nn.BatchNorm1d, nn.BatchNorm2d),
}


def _mlp(norm: type[nn.Module], dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 6), norm(6), nn.Tanh(), nn.Linear(6, 5), norm(5), nn.Linear(5, 3)
    ).to(dtype)


def _cnn(norm: type[nn.Module], dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3), norm(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)
    ).to(dtype)


def _batch(shape: tuple[int, ...], dtype: torch.dtype):
    gen = torch.Generator().manual_seed(1)
    x = 2 * torch.randn(shape, generator=gen).to(dtype) + 1
    return x, torch.randint(0, 3, (shape[0],), generator=gen)


def _max_rel(a: dict, b: dict) -> float:
    scale = max(float(t.abs().max()) for t in a.values())
    return max(float((a[n] - b[n]).abs().max()) for n in a) / scale


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("kind", list(NORMS))
@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_forward_mode_hvp_equals_double_backward_in_train_mode(net, kind, dtype):
    norm1d, norm2d = NORMS[kind]
    model = _mlp(norm1d, dtype) if net == "mlp" else _cnn(norm2d, dtype)
    batch = _batch((16, 4) if net == "mlp" else (8, 2, 6, 6), dtype)
    gen = torch.Generator().manual_seed(2)
    v = {n: torch.randn(p.shape, generator=gen).to(dtype) for n, p in model.named_parameters()}
    reverse = L.hvp(model, CE, batch, v, mode="train")
    forward = L.hvp(model, CE, batch, v, mode="train", method="forward")
    assert _max_rel(forward, reverse) < (1e-12 if dtype == torch.float64 else 2e-5)
    # and the batch statistics really take part: eval mode gives another product
    assert _max_rel(L.hvp(model, CE, batch, v, mode="eval"), reverse) > 1e-3


@pytest.mark.parametrize("kind", list(NORMS))
def test_forward_mode_eigenvalues_equal_reverse_mode_ones(kind):
    model = _mlp(NORMS[kind][0], torch.float64)
    batch = _batch((16, 4), torch.float64)
    reverse = L.top_eigenvalues(model, CE, batch, k=2, tol=1e-10)
    forward = L.top_eigenvalues(model, CE, batch, k=2, tol=1e-10, method="forward")
    assert forward.eigenvalues == pytest.approx(reverse.eigenvalues, rel=1e-9)
