"""PyTorch's own test inputs for nn.BatchNorm1d/2d/3d (``module_db``) run on bnlab.nn.

Every entry, in training and eval, float32 and float64: the output, the input and parameter
gradients and the buffers agree with torch.nn's, including ``bias=False`` (affine without a
bias) and empty training batches (an empty output, the running statistics untouched).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import bnlab.nn as bnn
from helpers import TOL, rel_err

pytest.importorskip("expecttest")  # torch.testing._internal.common_modules imports it
from torch.testing._internal.common_modules import module_db

OURS = {
    torch.nn.BatchNorm1d: bnn.BatchNorm1d,
    torch.nn.BatchNorm2d: bnn.BatchNorm2d,
    torch.nn.BatchNorm3d: bnn.BatchNorm3d,
}
DTYPES = (torch.float32, torch.float64)


def _cases() -> list[Any]:
    cases = []
    for info in module_db:
        if info.module_cls not in OURS:
            continue
        for dtype in DTYPES:
            for training in (True, False):
                inputs = info.module_inputs_func(
                    info, device="cpu", dtype=dtype, requires_grad=True, training=training
                )
                for index, module_input in enumerate(inputs):
                    desc = module_input.desc or "default"
                    mode = "train" if training else "eval"
                    name = f"{info.name}-{desc}-{mode}-{str(dtype)[6:]}"
                    cases.append(pytest.param(info, dtype, training, index, id=name))
    return cases


def _module_input(info: Any, dtype: torch.dtype, training: bool, index: int) -> Any:
    torch.manual_seed(index)  # module_db draws its inputs from the global generator
    inputs = info.module_inputs_func(
        info, device="cpu", dtype=dtype, requires_grad=True, training=training
    )
    return inputs[index]


def _perturb_buffers(layers: tuple[torch.nn.Module, ...], dtype: torch.dtype) -> None:
    """The same non-trivial running statistics in both layers, so eval is not x / sqrt(1 + eps)."""
    first = layers[0]
    if first.running_mean is None:
        return
    c = first.running_mean.shape[0]
    mean = torch.linspace(-1.0, 2.0, c, dtype=dtype)
    var = torch.linspace(0.5, 3.0, c, dtype=dtype)
    with torch.no_grad():
        for layer in layers:
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
            if layer.weight is not None:
                layer.weight.copy_(torch.linspace(0.5, 1.5, c, dtype=dtype))
            if layer.bias is not None:
                layer.bias.copy_(torch.linspace(-0.5, 0.5, c, dtype=dtype))


@pytest.mark.parametrize(("info", "dtype", "training", "index"), _cases())
def test_module_db_input_matches_torch_nn(info, dtype, training, index):
    module_input = _module_input(info, dtype, training, index)
    args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
    theirs = info.module_cls(*args, **kwargs, dtype=dtype)
    ours = OURS[info.module_cls](*args, **kwargs, dtype=dtype)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    _perturb_buffers((ours, theirs), dtype)
    ours.train(training)
    theirs.train(training)
    (x,) = module_input.forward_input.args
    tol = TOL[dtype]
    for step in range(2):  # two steps: the running buffers (and momentum=None's count) move twice
        xa = (x.detach() * (step + 1)).requires_grad_()
        xb = xa.detach().clone().requires_grad_()
        ya, yb = ours(xa), theirs(xb)
        assert ya.shape == yb.shape and ya.dtype == yb.dtype
        assert rel_err(ya, yb) <= tol
        dy = torch.randn(yb.shape, dtype=dtype, generator=torch.Generator().manual_seed(step))
        ya.backward(dy)
        yb.backward(dy)
        assert rel_err(xa.grad, xb.grad) <= tol
        for name, theirs_param in theirs.named_parameters():
            ours_param = getattr(ours, name)
            assert (ours_param.grad is None) == (theirs_param.grad is None), name
            if theirs_param.grad is not None:
                assert rel_err(ours_param.grad, theirs_param.grad) <= tol, name
            ours_param.grad = theirs_param.grad = None
    for name, buffer in theirs.named_buffers():
        ours_buffer = getattr(ours, name)
        assert ours_buffer.dtype == buffer.dtype, name
        if buffer.is_floating_point():
            assert rel_err(ours_buffer, buffer) <= tol, name
        else:
            assert torch.equal(ours_buffer, buffer), name
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
