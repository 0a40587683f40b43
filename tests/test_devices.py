"""Every variant on every available device and dtype (CUDA runs where a GPU exists; CI has none)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import bnlab.nn as bnn
from bnlab.functional import reference as R

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LOW = {torch.float16: 8, torch.bfloat16: 8}  # allowed error, in units of the dtype's epsilon


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p", [1, 2, math.inf])
def test_lp_layers_on_every_device_and_dtype(device, dtype, p):
    rng = np.random.default_rng(0)
    x64 = rng.normal(1.0, 2.0, size=(8, 3, 3, 3))
    layer = bnn.LpBatchNorm2d(3, p=p, device=device, dtype=dtype)
    x = torch.from_numpy(x64).to(device=device, dtype=dtype).requires_grad_()
    y = layer(x)
    dy = torch.from_numpy(rng.normal(size=x64.shape)).to(device=device, dtype=dtype)
    y.backward(dy)
    assert y.dtype == dtype and y.device.type == device and x.grad.dtype == dtype
    y_ref, cache = R.lp_batch_norm_forward(
        x.detach().double().cpu().numpy(), np.ones(3), np.zeros(3), 1e-5, p
    )
    dx_ref, _, _ = R.lp_batch_norm_backward(dy.double().cpu().numpy(), cache)
    if dtype in LOW:
        bound = LOW[dtype] * torch.finfo(dtype).eps
    else:
        bound = {torch.float32: 1e-5, torch.float64: 1e-10}[dtype]
    y_err = np.max(np.abs(y.detach().double().cpu().numpy() - y_ref)) / np.max(np.abs(y_ref))
    dx_err = np.max(np.abs(x.grad.double().cpu().numpy() - dx_ref)) / np.max(np.abs(dx_ref))
    assert y_err <= bound
    assert dx_err <= bound


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["bn", "noisy_bn", "ghost", "renorm"])
def test_bn_family_runs_on_device_in_half_precision(device, kind):
    options = {"virtual_batch_size": 4} if kind == "ghost" else {}
    layer = bnn.norm_layer(kind, 3, rank=2, device=device, dtype=torch.bfloat16, **options)
    x = (torch.randn(8, 3, 4, 4, device=device) * 3 + 2).to(torch.bfloat16).requires_grad_()
    y = layer(x)
    y.float().square().mean().backward()
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    layer.eval()
    assert layer(x).dtype == torch.bfloat16
