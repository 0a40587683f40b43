"""bnlab::norm_train and bnlab::norm_backward, the operators of lp, Ghost and noisy BatchNorm:
registration (opcheck), the CPU loops against the torch-op implementation and the eager kernels,
gradients and second derivatives in float64, and what torch.compile records."""

from __future__ import annotations

import pytest
import torch

import bnlab.functional as F
import bnlab.nn as bnn
from bnlab.functional import operators, ops
from bnlab.functional.noise import NoiseDraw, NoiseSpec
from helpers import rel_err

OPS = torch.ops.bnlab
KEY = (0x12345678, 0x2345678)

SPECS = [
    pytest.param(ops.NormSpec(1e-5, 1.0, centered=False), id="l1"),
    pytest.param(ops.NormSpec(1e-5, float("inf"), centered=False), id="linf"),
    pytest.param(ops.NormSpec(1e-5, 2.0, centered=False), id="l2"),
    pytest.param(ops.NormSpec(1e-5, 1.0), id="l1-centred"),
    pytest.param(ops.NormSpec(1e-5, virtual_batch_size=4), id="ghost"),
    pytest.param(ops.NormSpec(1e-5, noise=NoiseDraw(NoiseSpec(), KEY)), id="noisy"),
]


def _inputs(shape, dtype, channels_last=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=dtype) * 2 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.rand(shape[1], generator=gen, dtype=dtype) + 0.5
    bias = torch.randn(shape[1], generator=gen, dtype=dtype)
    return x, weight, bias


def _args(spec):
    key = None if spec.noise is None else torch.tensor(spec.noise.key, dtype=torch.int64)
    noise = [] if spec.noise is None else list(spec.noise.spec.constants)
    group = spec.virtual_batch_size or 0
    return (spec.eps, spec.p, spec.centered, group, key, noise)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize(
    ("shape", "dtype", "channels_last"),
    [((10, 3, 4, 4), torch.float64, False), ((10, 3, 4, 4), torch.float32, True)],
    ids=["nchw-f64", "channels_last-f32"],
)
def test_opcheck_norm_train_and_backward(spec, shape, dtype, channels_last):
    x, weight, bias = _inputs(shape, dtype, channels_last)
    torch.library.opcheck(OPS.norm_train.default, (x, weight, bias, *_args(spec)))
    _, stats, kept = OPS.norm_train(x, weight, bias, *_args(spec))
    assert kept.shape == (x.shape if spec.noise is not None else (0,))
    dy = torch.randn_like(x)
    for w, need_dx in ((weight, True), (None, False)):
        args = (dy, x, w, stats, kept, *_args(spec), need_dx)
        torch.library.opcheck(OPS.norm_backward.default, args)


@pytest.mark.parametrize("spec", SPECS)
def test_the_loops_the_torch_op_implementation_and_the_eager_kernels_agree(spec):
    x, weight, bias = _inputs((10, 3, 4, 4), torch.float64)
    x.requires_grad_()
    dy = torch.randn_like(x)
    results = []
    for kernels in (True, False):
        with F.use_kernels(kernels):
            y, stats = operators.normalize(x, weight, bias, spec)
            (dx,) = torch.autograd.grad(y, x, dy)
        results.append((y, stats.mean, stats.spread, dx))
    eager, eager_stats = F.normalize_train(x, weight, bias, spec)  # the eager dispatch
    (eager_dx,) = torch.autograd.grad(eager, x, dy)
    results.append((eager, eager_stats.mean, eager_stats.spread, eager_dx))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert rel_err(a, b) <= 1e-10


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("kernels", [True, False])
def test_gradients_and_second_derivatives_are_exact(spec, kernels):
    x, weight, bias = (t.requires_grad_() for t in _inputs((8, 2, 3), torch.float64))

    def train(x, w, b):
        return operators.normalize(x, w, b, spec)[0]

    with F.use_kernels(kernels):
        assert torch.autograd.gradcheck(train, (x, weight, bias))
        assert torch.autograd.gradgradcheck(train, (x, weight, bias))
        assert torch.autograd.gradgradcheck(lambda x: train(x, None, None), (x,))


def test_a_batch_with_one_value_per_channel_in_a_group_is_refused():
    x, weight, bias = _inputs((5, 3), torch.float32)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        operators.normalize(x, weight, bias, ops.NormSpec(1e-5, virtual_batch_size=2))


@pytest.mark.parametrize("kind", ["l1", "linf", "ghost", "noisy_bn"])
def test_compile_records_the_variant_operator(kind):
    options = {"virtual_batch_size": 4} if kind == "ghost" else {}
    layer = bnn.norm_layer(kind, 3, 2, **options)
    graphs = []

    def backend(gm, _inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    compiled(torch.randn(8, 3, 4, 4))
    targets = {str(node.target) for gm in graphs for node in gm.graph.nodes}
    assert "bnlab.norm_train.default" in targets, targets
