"""The bnlab:: operators (bnlab.functional.operators): registration (opcheck), gradients in
float64 (gradcheck, gradgradcheck), the CPU kernels against the torch-op implementation, and
torch.nn's numbers."""

from __future__ import annotations

import contextlib

import pytest
import torch

import bnlab.functional as F
from bnlab.functional import operators, ops
from helpers import TOL, rel_err

OPS = torch.ops.bnlab


def _inputs(shape, dtype=torch.float64, channels_last=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=dtype) * 2 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    weight = torch.rand(c, generator=gen, dtype=dtype) + 0.5
    bias = torch.randn(c, generator=gen, dtype=dtype)
    return x, weight, bias


CASES = [
    pytest.param((6, 3, 4, 4), torch.float64, False, id="nchw-f64"),
    pytest.param((6, 3, 4, 4), torch.float32, True, id="channels_last-f32"),
    pytest.param((5, 4), torch.float32, False, id="2d-f32"),
    pytest.param((4, 2, 9, 9), torch.float64, False, id="planar-f64"),  # 81 >= 64: planar loops
]


@pytest.mark.parametrize(("shape", "dtype", "channels_last"), CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_opcheck_batch_norm_train(shape, dtype, channels_last, affine):
    x, weight, bias = _inputs(shape, dtype, channels_last)
    args = (x, weight, bias, 1e-5) if affine else (x, None, None, 1e-3)
    torch.library.opcheck(OPS.batch_norm_train.default, args)


@pytest.mark.parametrize(("shape", "dtype", "channels_last"), CASES)
def test_opcheck_batch_norm_backward(shape, dtype, channels_last):
    x, weight, _ = _inputs(shape, dtype, channels_last)
    _, stats = OPS.batch_norm_train(x, weight, None, 1e-5)
    dy = torch.randn_like(x)
    torch.library.opcheck(OPS.batch_norm_backward.default, (dy, x, weight, stats, 1e-5, True))
    torch.library.opcheck(OPS.batch_norm_backward.default, (dy, x, None, stats, 1e-5, False))


@pytest.mark.parametrize(("shape", "dtype", "channels_last"), CASES)
@pytest.mark.parametrize("is_var", [True, False])
def test_opcheck_batch_norm_eval(shape, dtype, channels_last, is_var):
    x, weight, bias = _inputs(shape, dtype, channels_last)
    mean, spread = torch.randn_like(weight), torch.rand_like(weight) + 0.5
    torch.library.opcheck(
        OPS.batch_norm_eval.default, (x, mean, spread, weight, bias, 1e-5, is_var)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_renorm_correction(dtype):
    scale, mean = torch.rand(5, dtype=dtype) + 0.5, torch.randn(5, dtype=dtype)
    running_mean, running_var = torch.randn(5), torch.rand(5) + 0.1
    args = (scale, mean, running_mean, running_var, 1e-5, 3.0, 5.0)
    torch.library.opcheck(OPS.renorm_correction.default, args)
    r, d = OPS.renorm_correction(*args)
    sigma = (running_var.to(dtype) + 1e-5).sqrt()
    torch.testing.assert_close(r, (scale / sigma).clamp(1 / 3, 3))
    torch.testing.assert_close(d, ((mean - running_mean.to(dtype)) / sigma).clamp(-5, 5))


@pytest.mark.parametrize("kernels", [True, False])
def test_gradients_and_second_derivatives_are_exact(kernels):
    """Through the CPU kernels and through the torch-op implementation, float64."""
    x, weight, bias = (t.requires_grad_() for t in _inputs((5, 3, 3, 2)))
    with F.use_kernels(kernels):
        train = lambda x, w, b: operators.batch_norm_train(x, w, b, 1e-5)[0]  # noqa: E731
        assert torch.autograd.gradcheck(train, (x, weight, bias))
        assert torch.autograd.gradgradcheck(train, (x, weight, bias))
        mean, spread = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
        evaluate = lambda x, w, b: operators.batch_norm_eval(x, mean, spread, w, b, 1e-5, True)  # noqa: E731
        assert torch.autograd.gradcheck(evaluate, (x, weight, bias))
        assert torch.autograd.gradgradcheck(evaluate, (x, weight, bias))


@pytest.mark.parametrize("kernels", [True, False])
def test_closed_form_second_derivatives_without_affine_and_for_one_input(kernels):
    """gradgradcheck of the backward operator's registered autograd (the closed form) where
    weight is None and where only some inputs want gradients."""
    x, weight, _ = _inputs((4, 3, 5))
    x.requires_grad_()
    with F.use_kernels(kernels):
        plain = lambda x: operators.batch_norm_train(x, None, None, 1e-3)[0]  # noqa: E731
        assert torch.autograd.gradgradcheck(plain, (x,))
        weight.requires_grad_()
        scaled = lambda w: operators.batch_norm_train(x.detach(), w, None, 1e-5)[0]  # noqa: E731
        assert torch.autograd.gradgradcheck(scaled, (weight,))


def _third_derivatives(norm, x, weight):
    x, weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
    y = norm(x, weight)
    (g,) = torch.autograd.grad((y**3).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad((g * g).sum(), x, create_graph=True)
    return torch.autograd.grad((h * h).sum(), (x, weight))


def test_third_derivatives_match_the_differentiated_torch_op_formulas():
    """Under create_graph the closed form recomputes the statistics from x, so a third
    derivative is exact: it equals autograd's through the torch-op formulas (torch.nn's own
    batch_norm differs here in x, by tens of percent: its double backward holds the saved
    statistics constant)."""
    x, weight, _ = _inputs((5, 3, 3, 2))
    ours = _third_derivatives(
        lambda x, w: operators.batch_norm_train(x, w, None, 1e-5)[0], x, weight
    )
    want = _third_derivatives(lambda x, w: ops.train(x, w, None, ops.NormSpec(1e-5))[0], x, weight)
    for a, b in zip(ours, want, strict=True):
        assert rel_err(a, b) <= 1e-10


@pytest.mark.parametrize(
    "spec",
    [ops.NormSpec(1e-5), ops.NormSpec(1e-5, 1.0, centered=False)],
    ids=["bn", "l1 (torch-op fallback)"],
)
def test_backward_with_graph_gives_the_torch_op_formulas_hessian_vector_products(spec):
    x, weight, bias = (t.requires_grad_() for t in _inputs((6, 3, 4, 4)))
    v = [torch.randn_like(t) for t in (x, weight, bias)]
    results = []
    for ours in (True, False):
        y, _ = ops.train(x, weight, bias, spec)
        dy = 3 * y * y  # the upstream gradient of (y^3).sum(), itself a function of x
        if ours:
            grads = operators.backward_with_graph((True,) * 3, spec, x, weight, bias, dy)
        else:
            grads = torch.autograd.grad(y, (x, weight, bias), dy, create_graph=True)
        results.append((grads, torch.autograd.grad(grads, (x, weight, bias), v)))
    (grads, hvp), (want_grads, want_hvp) = results
    for a, b in zip((*grads, *hvp), (*want_grads, *want_hvp), strict=True):
        assert rel_err(a, b) <= 1e-10


@pytest.mark.parametrize("native", [True, False], ids=["native glue", "python glue"])
def test_an_eager_module_hvp_goes_through_the_closed_form_and_matches_torch_nn(native, monkeypatch):
    """Both glues' create_graph backward runs operators.backward_with_graph (not the torch-op
    re-derivation); the Hessian-vector product equals torch.nn's in float64."""
    from bnlab.functional import kernels
    from bnlab.functional.kernels import native as glue
    from bnlab.nn import BatchNorm2d

    assert kernels._graph_backward is operators.backward_with_graph
    calls = []
    monkeypatch.setattr(
        kernels, "_graph_backward", lambda *a: calls.append(1) or operators.backward_with_graph(*a)
    )
    x = torch.randn(8, 3, 5, 5, dtype=torch.float64) * 2 + 1
    v = torch.randn_like(x)
    weight, bias = torch.rand(3, dtype=torch.float64) + 0.5, torch.rand(3, dtype=torch.float64)
    hvps = []
    for layer in (BatchNorm2d(3), torch.nn.BatchNorm2d(3)):
        layer = layer.double()
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
        xr = x.clone().requires_grad_()
        with glue.disabled() if not native else contextlib.nullcontext():
            loss = (layer(xr) ** 3).sum()
            (g,) = torch.autograd.grad(loss, xr, create_graph=True)
            hvps.append(torch.autograd.grad(g, xr, v)[0])
        if not calls:
            pytest.fail("the bnlab layer's double backward did not run the registered one")
    assert rel_err(hvps[0], hvps[1]) <= 1e-10


@pytest.mark.parametrize(("shape", "dtype", "channels_last"), CASES)
def test_cpu_kernels_match_the_torch_op_implementation_and_torch_nn(shape, dtype, channels_last):
    x, weight, bias = _inputs(shape, dtype, channels_last)
    dy = torch.randn_like(x)
    outs = {}
    for kernels in (True, False):
        with F.use_kernels(kernels):
            y, stats = OPS.batch_norm_train(x, weight, bias, 1e-5)
            grads = OPS.batch_norm_backward(dy, x, weight, stats, 1e-5, True)
            outs[kernels] = (y, stats, *grads)
    tol = TOL[dtype]
    for a, b in zip(outs[True], outs[False], strict=True):
        assert rel_err(a, b) <= tol
    xr, wr, br = (t.clone().requires_grad_() for t in (x, weight, bias))
    want = torch.nn.functional.batch_norm(xr, None, None, wr, br, True, eps=1e-5)
    want.backward(dy)
    y, _, dx, dweight, dbias = outs[True]
    assert y.stride() == x.stride() and dx.stride() == x.stride()
    for got, expected in ((y, want), (dx, xr.grad), (dweight, wr.grad), (dbias, br.grad)):
        assert rel_err(got, expected) <= tol


def test_low_precision_runs_in_float32_on_the_cpu():
    x, weight, bias = _inputs((8, 3, 4, 4), torch.float32)
    y, stats = OPS.batch_norm_train(x.bfloat16(), weight, bias, 1e-5)
    want = torch.nn.functional.batch_norm(x.bfloat16().float(), None, None, weight, bias, True)
    assert y.dtype == torch.bfloat16 and stats.dtype == torch.float64
    assert rel_err(y, want) <= 2 * torch.finfo(torch.bfloat16).eps * want.abs().max()


def test_hessian_vector_product_through_the_operator_matches_torch_nn():
    x, weight, bias = _inputs((6, 3, 4, 4))
    v = torch.randn_like(x)
    results = []
    for train in (
        lambda x, w, b: operators.batch_norm_train(x, w, b, 1e-5)[0],
        lambda x, w, b: torch.nn.functional.batch_norm(x, None, None, w, b, True, eps=1e-5),
    ):
        xr, wr, br = (t.clone().requires_grad_() for t in (x, weight, bias))
        loss = (train(xr, wr, br) ** 3).sum()
        grads = torch.autograd.grad(loss, (xr, wr, br), create_graph=True)
        results.append(torch.autograd.grad(grads[0], (xr, wr, br), v))
    for ours, theirs in zip(*results, strict=True):
        assert rel_err(ours, theirs) <= 1e-10


def test_running_buffers_move_like_torch_nn():
    x, weight, bias = _inputs((6, 3, 4, 4))
    ours = (torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5)
    theirs = tuple(t.clone() for t in ours)
    y = operators.batch_norm(x, weight, bias, *ours, 0.3, 1e-5)
    want = torch.nn.functional.batch_norm(x, *theirs, weight, bias, True, 0.3, 1e-5)
    assert rel_err(y, want) <= 1e-12
    for a, b in zip(ours, theirs, strict=True):
        assert rel_err(a, b) <= 1e-12


def test_eager_cpu_calls_keep_the_native_path_and_other_cases_take_the_operators():
    x = torch.randn(4, 3, 2, 2)
    assert not operators.wanted(x)
    assert operators.wanted(torch.randn(4, 3, 2, 2, device="meta"))
    with torch.autograd.forward_ad.dual_level():
        assert not operators.wanted(x)  # no jvp rule: the torch-op formulas
