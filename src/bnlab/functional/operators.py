"""bnlab's normalizations as PyTorch operators (``torch.library``, namespace ``bnlab``).

Five operators, each with a schema, a CPU implementation over the fused kernels
(:mod:`bnlab.functional.kernels`; the torch-op formulas for what the kernels do not take:
fp16/bf16, empty inputs), a torch-op implementation for every other device, a fake
implementation (shapes and dtypes only, for ``torch.compile`` and export) and a registered
autograd formula:

- ``bnlab::batch_norm_train(x, weight, bias, eps) -> (y, stats)``: training-mode BatchNorm;
  ``stats`` (5, 1, C) float64 holds the rows mean, biased variance, s = sqrt(var + eps) and
  (for Batch Renormalization's layout) r = 1, d = 0, as the kernels write them. The running
  buffers are moved outside the operator (:func:`batch_norm`), so the operator is functional
  and its autograd formula can be registered.
- ``bnlab::batch_norm_backward(dy, x, weight, stats, need_dx) -> (dx, dweight, dbias)``: the
  fused backward; its own registered autograd is the double backward (Hessian-vector
  products) in closed form (:func:`second_derivatives`). :func:`backward_with_graph` is a
  ``create_graph=True`` backward that goes through it.
- ``bnlab::batch_norm_eval(x, mean, spread, weight, bias, eps, is_var) -> y``: normalization
  with running statistics.
- ``bnlab::norm_train(x, weight, bias, eps, p, centered, group_size, noise_key, noise) ->
  (y, stats, kept)`` and ``bnlab::norm_backward(dy, x, weight, stats, kept, ...)``: the same
  pair for lp, Ghost and noisy BatchNorm (the variant in the arguments; noisy BatchNorm's step
  key an int64 tensor, so a compiled step computes it in the graph; ``kept`` its noise
  multipliers s, x's shape, which the loops' backward reads, or empty without noise); their
  double backward differentiates the torch-op backward.

The operators are what ``torch.compile(fullgraph=True)`` and ``torch.func.grad`` see: Dynamo
records one node per layer and never traces into the kernels. Eager calls on the CPU keep the
native glue's shorter path (:func:`wanted` says when the operators run instead), because a
Python-defined operator costs some tens of microseconds per call, more than a small layer's
whole step (see the README's benchmark section).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor

from bnlab.functional import kernels, ops
from bnlab.functional.noise import NoiseDraw, NoiseSpec
from bnlab.functional.noise import multipliers as noise_multipliers

__all__ = ["batch_norm", "batch_norm_backward", "batch_norm_eval", "batch_norm_train", "wanted"]

MEAN, SPREAD, SCALE, R, D = range(5)
"""The rows of ``stats``, as the kernels write them."""


def wanted(x: Tensor) -> bool:
    """Whether a normalization of x goes through the operators: under ``torch.compile``
    (Dynamo records the operator and never traces the kernels' Python) and on any device but
    the CPU (the operators' torch-op implementation). Under a ``torch.func`` transform or
    forward-mode AD the torch-op formulas of :mod:`bnlab.functional.ops` run instead: an
    operator's registered autograd serves reverse mode outside torch.func only."""
    if torch.compiler.is_compiling():
        return True
    if forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active():
        return False
    return not x.is_cpu


def _compute(x: Tensor) -> Tensor:
    """x in its compute precision (fp16/bf16 in float32)."""
    return x.float() if x.dtype in ops.LOW_PRECISION else x


def _on_loops(x: Tensor) -> bool:
    from bnlab.functional import kernels_enabled

    return kernels_enabled() and kernels.supports(x)


# --- training --------------------------------------------------------------------------------


@torch.library.custom_op("bnlab::batch_norm_train", mutates_args=())
def batch_norm_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """Training-mode BatchNorm of x (N, C, *) over the mini-batch: (y, stats (5, 1, C)
    float64). This body is the torch-op implementation (every device but the CPU)."""
    return _train_formulas(x, weight, bias, eps)


def _train_formulas(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    xc = _compute(x)
    y, stats = ops.train(xc, weight, bias, ops.NormSpec(eps))
    return y.to(x.dtype), _stats_rows(stats.mean.double(), stats.spread.double(), eps)


def _stats_rows(mean: Tensor, spread: Tensor, eps: float) -> Tensor:
    """(5, G, C) float64 rows as the kernels write them, from (G, C) mean and variance."""
    return torch.stack(
        [mean, spread, torch.sqrt(spread + eps), torch.ones_like(mean), torch.zeros_like(mean)]
    )


@batch_norm_train.register_kernel("cpu")
def _batch_norm_train_cpu(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    if not _on_loops(x):
        return _train_formulas(x, weight, bias, eps)
    with torch.no_grad():  # the glue would otherwise wire its own autograd node
        y, stats, _ = kernels.train_normalize(x, weight, bias, ops.NormSpec(eps))
    base = stats.mean._base  # the glue returns views of the loop's (5, G, C) rows
    if base is not None and base.shape == (5, *stats.mean.shape):
        return y, base
    return y, _stats_rows(stats.mean, stats.spread, eps)


@batch_norm_train.register_fake
def _batch_norm_train_fake(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    _offer_inductor_decompositions()
    return torch.empty_like(x), x.new_empty((5, 1, x.shape[1]), dtype=torch.float64)


def _train_setup(ctx: Any, inputs: tuple[object, ...], output: tuple[Tensor, Tensor]) -> None:
    x, weight, _, eps = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.eps = eps


def _train_backward(
    ctx: Any, dy: Tensor | None, _dstats: Tensor | None
) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
    x, weight, stats = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if dy is None:
        return None, None, None, None
    dx, dweight, dbias = batch_norm_backward(dy, x, weight, stats, ctx.eps, bool(needs[0]))
    return (
        dx if needs[0] else None,
        dweight.to(weight.dtype) if needs[1] else None,
        dbias if needs[2] else None,
        None,
    )


batch_norm_train.register_autograd(_train_backward, setup_context=_train_setup)


# --- backward and double backward ------------------------------------------------------------


def _backward_formula(
    dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, scale: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """BatchNorm's backward as tensor formulas (Ioffe & Szegedy 2015, reference.py's
    batch_norm_backward): dbias = sum dy, dweight = sum dy x_hat,
    dx = (w / s) (dy - dbias / m - x_hat dweight / m)."""
    dims = ops.reduce_dims(x)
    m = x.numel() // x.shape[1]
    x_hat = (x - ops.channel_view(mean, x)) / ops.channel_view(scale, x)
    dbias = dy.sum(dims)
    dweight = (dy * x_hat).sum(dims)
    gain = 1.0 / scale if weight is None else weight.to(scale.dtype) / scale
    inner = dy - ops.channel_view(dbias / m, x) - x_hat * ops.channel_view(dweight / m, x)
    return ops.channel_view(gain, x) * inner, dweight, dbias


@torch.library.custom_op("bnlab::batch_norm_backward", mutates_args=())
def batch_norm_backward(
    dy: Tensor, x: Tensor, weight: Tensor | None, stats: Tensor, eps: float, need_dx: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """The backward of :func:`batch_norm_train`: (dx, dweight, dbias), dx in x's dtype (zeros
    when not ``need_dx``), dweight and dbias in x's compute dtype. This body is the torch-op
    implementation (every device but the CPU)."""
    return _backward_formulas(dy, x, weight, stats, need_dx)


def _backward_formulas(
    dy: Tensor, x: Tensor, weight: Tensor | None, stats: Tensor, need_dx: bool
) -> tuple[Tensor, Tensor, Tensor]:
    xc, dyc = _compute(x), _compute(dy)
    mean, scale = stats[MEAN, 0].to(xc.dtype), stats[SCALE, 0].to(xc.dtype)
    dx, dweight, dbias = _backward_formula(dyc, xc, weight, mean, scale)
    return (dx.to(x.dtype) if need_dx else torch.zeros_like(x)), dweight, dbias


@batch_norm_backward.register_kernel("cpu")
def _batch_norm_backward_cpu(
    dy: Tensor, x: Tensor, weight: Tensor | None, stats: Tensor, eps: float, need_dx: bool
) -> tuple[Tensor, Tensor, Tensor]:
    if not _on_loops(x):
        return _backward_formulas(dy, x, weight, stats, need_dx)
    return _fused_backward(dy, x, weight, stats, ops.NormSpec(eps), need_dx)


def _fused_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    stats: Tensor,
    spec: ops.NormSpec,
    need_dx: bool,
    kept: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The loops' backward behind the Python Function (FusedTrainNorm), given what its forward
    would have kept (``stats`` as the loops wrote them, ``kept`` the noise multipliers); the
    weight's stand-in gives dweight and dbias in x's dtype."""
    x, plan = kernels.planned(x, spec.virtual_batch_size)
    w = weight if weight is not None else torch.ones(x.shape[1], dtype=x.dtype)
    kept = plan.like(kept, x) if kept is not None and spec.noise is not None else None
    ctx = SimpleNamespace(
        saved_tensors=(x, w, w, kept),
        needs_input_grad=(need_dx, True, True),
        state=(spec, plan, stats.numpy()),
    )
    with torch.no_grad():
        dx, dweight, dbias, *_ = kernels.FusedTrainNorm.backward(ctx, dy)
    assert dweight is not None and dbias is not None  # the stand-in weight asks for both
    return (torch.zeros_like(x) if dx is None else dx), dweight, dbias


@batch_norm_backward.register_fake
def _batch_norm_backward_fake(
    dy: Tensor, x: Tensor, weight: Tensor | None, stats: Tensor, eps: float, need_dx: bool
) -> tuple[Tensor, Tensor, Tensor]:
    c = x.shape[1]
    dtype = _compute(x).dtype
    return torch.empty_like(x), x.new_empty(c, dtype=dtype), x.new_empty(c, dtype=dtype)


def _backward_setup(ctx: Any, inputs: tuple[object, ...], output: object) -> None:
    dy, x, weight, stats, eps, _ = inputs
    ctx.save_for_backward(dy, x, weight, stats)
    ctx.eps = eps


def _double_backward(
    ctx: Any, ddx: Tensor | None, ddweight: Tensor | None, ddbias: Tensor | None
) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None, None]:
    """Gradients of (dx, dweight, dbias) with respect to (dy, x, weight), in closed form: the
    second derivatives of BatchNorm (:func:`second_derivatives`), a dozen elementwise passes
    instead of re-running the forward and differentiating it. Under ``create_graph`` the
    statistics are recomputed from x with torch ops, so third derivatives are exact too."""
    dy, x, weight, stats = ctx.saved_tensors
    needs = ctx.needs_input_grad
    xc = _compute(x)
    if torch.is_grad_enabled():
        batch = ops.batch_stats(xc, ctx.eps)
        mean, scale = batch.mean, batch.scale
    else:
        mean, scale = stats[MEAN, 0].to(xc.dtype), stats[SCALE, 0].to(xc.dtype)
    d_dy, d_x, d_weight = second_derivatives(
        _compute(dy), xc, weight, mean, scale, ddx, ddweight, ddbias, needs[:3]
    )
    return (
        None if d_dy is None else d_dy.to(dy.dtype),
        None if d_x is None else d_x.to(x.dtype),
        None if d_weight is None or weight is None else d_weight.to(weight.dtype),
        None,
        None,
        None,
    )


def second_derivatives(
    g: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    scale: Tensor,
    ddx: Tensor | None,
    ddweight: Tensor | None,
    ddbias: Tensor | None,
    needs: tuple[bool, ...] = (True, True, True),
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The vector-Jacobian product of BatchNorm's backward (g = dy, x, w) -> (dx, dw, db) with
    (ddx, ddw, ddb): ``(d_g, d_x, d_w)`` (None where ``needs`` says no; a missing dd* counts as
    zero). With x_hat = (x - mean) / s and per-channel means over the M values of a channel,
    A = mean(g x_hat), B = mean(ddx x_hat), K = mean(ddx (g - mean g)):

    d_g = (w / s) (ddx - mean ddx - x_hat B) + ddw x_hat + ddb
    d_x = (ddw / s) (g - mean g - x_hat A)
          + (w / s^2) (x_hat (3 A B - K) - B (g - mean g) - A (ddx - mean ddx))
    d_w = (M / s) (K - A B)

    (from dx = (w / s)(g - mean g - x_hat A), d x_hat / dx = (1 / s)(I - 1/M - x_hat x_hat^T / M)
    and d s / dx = x_hat / M; torch's ``batchnorm_double_backward`` computes the same).
    """
    need_g, need_x, need_w = needs[0], needs[1], needs[2] and weight is not None
    dims = ops.reduce_dims(x)
    m = x.numel() // x.shape[1]

    def per_channel(v: Tensor) -> Tensor:
        return ops.channel_view(v, x)

    def channel_mean(t: Tensor) -> Tensor:
        return per_channel(t.sum(dims) / m)

    inv = per_channel(1.0 / scale)
    w = inv if weight is None else per_channel(weight.to(x.dtype)) * inv  # w / s
    x_hat = (x - per_channel(mean)) * inv
    d_g = d_x = d_w = None
    g_centred = g - channel_mean(g) if need_x or ddx is not None else g
    a = channel_mean(g * x_hat)
    if ddx is not None:
        ddx = ddx.to(x.dtype)
        b = channel_mean(ddx * x_hat)
        dd_centred = ddx - channel_mean(ddx)
        if need_g:
            d_g = w * (dd_centred - x_hat * b)
        if need_x or need_w:
            k = channel_mean(ddx * g_centred)
        if need_x:
            d_x = (w * inv) * (x_hat * (3 * a * b - k) - b * g_centred - a * dd_centred)
        if need_w:
            d_w = ((k - a * b) * (m * inv)).reshape(-1)
    if ddweight is not None:
        ddw = per_channel(ddweight.to(x.dtype))
        if need_g:
            d_g = ddw * x_hat if d_g is None else d_g + ddw * x_hat
        if need_x:
            extra = (ddw * inv) * (g_centred - x_hat * a)
            d_x = extra if d_x is None else d_x + extra
    if ddbias is not None and need_g:
        ddb = per_channel(ddbias.to(x.dtype))
        d_g = ddb.expand_as(x) if d_g is None else d_g + ddb
    if need_g and d_g is None:
        d_g = torch.zeros_like(g)
    if need_x and d_x is None:
        d_x = torch.zeros_like(x)
    if need_w and d_w is None:
        d_w = torch.zeros_like(mean)
    return d_g, d_x, d_w


batch_norm_backward.register_autograd(_double_backward, setup_context=_backward_setup)


def backward_with_graph(
    needs: tuple[bool, ...],
    spec: ops.NormSpec,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    dy: Tensor,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """A training normalization's backward as a differentiable result, for a backward run with
    ``create_graph=True`` (double backward, Hessian-vector products): (dx, dweight, dbias) for
    the ``needs`` of (x, weight, bias). BatchNorm's goes through ``bnlab::batch_norm_backward``
    (the fused backward, then the closed-form second derivatives); the other variants through
    the differentiated torch-op forward (:func:`kernels.torch_op_backward`)."""
    plain = spec.p == 2 and spec.centered and spec.virtual_batch_size is None
    if not (plain and spec.renorm is None and spec.noise is None):
        return kernels.torch_op_backward(needs, spec, x, weight, bias, dy)
    xc = _compute(x).detach()
    if _on_loops(xc):  # the loops' statistics pass: torch's var_mean over (N, H, W) took 10x
        with torch.no_grad():
            _, batch, _ = kernels.train_normalize(xc, None, None, ops.NormSpec(spec.eps))
        stats = _stats_rows(batch.mean.double(), batch.spread.double(), spec.eps)
    else:
        var, mean = torch.var_mean(xc, ops.reduce_dims(xc), correction=0)
        stats = _stats_rows(mean.double().unsqueeze(0), var.double().unsqueeze(0), spec.eps)
    dx, dweight, dbias = batch_norm_backward(dy, x, weight, stats, spec.eps, needs[0])
    return (
        dx if needs[0] else None,
        dweight.to(weight.dtype) if needs[1] and weight is not None else None,
        dbias.to(bias.dtype) if needs[2] and bias is not None else None,
    )


kernels.use_graph_backward(backward_with_graph)


# --- the variants: lp, Ghost and noisy BatchNorm -------------------------------------------------
#
# One operator pair for every statistics variant the loops compute (not renorm, whose r and d
# read the running buffers: it runs as torch-op formulas under compile). The variant is in the
# arguments: p (1, 2, inf), centered (False: lp as the paper defines it), group_size (Ghost
# BatchNorm's virtual batch; 0: the whole batch) and noisy BatchNorm's step key (int64 (2,),
# None: no noise) with its constants (n_mu, n_sigma, r_mu, r_sigma).


def _variant_spec(*variant: Any, key_as_ints: bool) -> ops.NormSpec:
    """The NormSpec of an operator call's (eps, p, centered, group_size, noise_key, noise).
    ``key_as_ints``: the key's words as Python ints (the loops take them), else as int64
    tensors (no device sync, for the torch-op formulas)."""
    eps, p, centered, group_size, noise_key, noise = variant
    draw = None
    if noise_key is not None:
        words = noise_key.tolist() if key_as_ints else (noise_key[0], noise_key[1])
        draw = NoiseDraw(NoiseSpec(*noise), (words[0], words[1]))
    return ops.NormSpec(
        eps, p, virtual_batch_size=group_size or None, noise=draw, centered=centered
    )


@torch.library.custom_op("bnlab::norm_train", mutates_args=())
def norm_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    p: float,
    centered: bool,
    group_size: int,
    noise_key: Tensor | None,
    noise: list[float],
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode lp, Ghost or noisy BatchNorm of x (N, C, *): (y, stats (5, G, C)
    float64, G the number of groups; kept: the noise multipliers s with x's shape and dtype,
    or an empty tensor without noise). This body is the torch-op implementation."""
    variant = (eps, p, centered, group_size, noise_key, noise)
    return _variant_formulas(x, weight, bias, _variant_spec(*variant, key_as_ints=False))


def _variant_formulas(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, spec: ops.NormSpec
) -> tuple[Tensor, Tensor, Tensor]:
    xc = _compute(x)
    y, stats = ops.train(xc, weight, bias, spec)
    mean, spread = stats.mean.double(), stats.spread.double()
    scale = torch.sqrt(spread + spec.eps) if spec.p == 2 else spread + spec.eps
    rows = [mean, spread, scale, torch.ones_like(mean), torch.zeros_like(mean)]
    kept = x.new_empty(0)
    if spec.noise is not None:
        kept = torch.empty_like(x).copy_(noise_multipliers(x.shape, spec.noise, xc.dtype, x.device))
    return y.to(x.dtype), torch.stack(rows), kept


@norm_train.register_kernel("cpu")
def _norm_train_cpu(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, *variant: Any
) -> tuple[Tensor, Tensor, Tensor]:
    spec = _variant_spec(*variant, key_as_ints=_on_loops(x))
    if not _on_loops(x):
        return _variant_formulas(x, weight, bias, spec)
    x, plan = kernels.planned(x, spec.virtual_batch_size)
    found: list[Any] = []
    with torch.no_grad():  # the Function would otherwise wire its own autograd node
        y = kernels.FusedTrainNorm.apply(
            x, weight, bias, spec, plan, kernels._track_args(None, x.dtype), found, True
        )
    stats, kept = found
    return y, torch.from_numpy(stats), x.new_empty(0) if kept is None else kept


@norm_train.register_fake
def _norm_train_fake(x: Tensor, *args: Any) -> tuple[Tensor, Tensor, Tensor]:
    group_size, noise_key = args[5], args[6]
    groups = 1 if group_size == 0 else -(-x.shape[0] // group_size)
    kept = x.new_empty(0) if noise_key is None else torch.empty_like(x)
    return torch.empty_like(x), x.new_empty((5, groups, x.shape[1]), dtype=torch.float64), kept


def _norm_train_setup(
    ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor, Tensor]
) -> None:
    x, weight, _, eps, p, centered, group_size, noise_key, noise = inputs
    ctx.save_for_backward(x, weight, output[1], output[2], noise_key)
    ctx.variant = (eps, p, centered, group_size, noise)


def _norm_train_backward(
    ctx: Any, dy: Tensor | None, _dstats: Tensor | None, _dkept: Tensor | None
) -> tuple[Tensor | None, ...]:
    x, weight, stats, kept, noise_key = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if dy is None:
        return (None,) * 9
    eps, p, centered, group_size, noise = ctx.variant
    dx, dweight, dbias = norm_backward(
        dy, x, weight, stats, kept, eps, p, centered, group_size, noise_key, noise,
        bool(needs[0]),
    )  # fmt: skip
    return (
        dx if needs[0] else None,
        dweight.to(weight.dtype) if needs[1] else None,
        dbias if needs[2] else None,
        *(None,) * 6,
    )


norm_train.register_autograd(_norm_train_backward, setup_context=_norm_train_setup)


@torch.library.custom_op("bnlab::norm_backward", mutates_args=())
def norm_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    stats: Tensor,
    kept: Tensor,
    eps: float,
    p: float,
    centered: bool,
    group_size: int,
    noise_key: Tensor | None,
    noise: list[float],
    need_dx: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The backward of :func:`norm_train`: (dx, dweight, dbias) as :func:`batch_norm_backward`.
    This body is the torch-op implementation (the differentiated forward formulas, which make
    the noise again from the key: ``kept`` is for the loops)."""
    spec = _variant_spec(eps, p, centered, group_size, noise_key, noise, key_as_ints=False)
    return _variant_backward_formulas(dy, x, weight, spec, need_dx)


def _variant_backward_formulas(
    dy: Tensor, x: Tensor, weight: Tensor | None, spec: ops.NormSpec, need_dx: bool
) -> tuple[Tensor, Tensor, Tensor]:
    xc, dyc = _compute(x).detach(), _compute(dy)
    c = x.shape[1]
    w = torch.ones(c, dtype=xc.dtype, device=x.device) if weight is None else weight.detach()
    b = torch.zeros(c, dtype=xc.dtype, device=x.device)
    # torch.func: an operator's body runs below autograd, where a plain autograd graph is not
    # recorded
    pullback = torch.func.vjp(lambda x, w, b: ops.train(x, w, b, spec)[0], xc, w, b)[1]
    dx, dweight, dbias = pullback(dyc)
    return (dx.to(x.dtype) if need_dx else torch.zeros_like(x)), dweight.to(xc.dtype), dbias


@norm_backward.register_kernel("cpu")
def _norm_backward_cpu(
    dy: Tensor, x: Tensor, weight: Tensor | None, stats: Tensor, kept: Tensor, *variant: Any
) -> tuple[Tensor, Tensor, Tensor]:
    need_dx = variant[-1]
    spec = _variant_spec(*variant[:-1], key_as_ints=_on_loops(x))
    if not _on_loops(x):
        return _variant_backward_formulas(dy, x, weight, spec, need_dx)
    return _fused_backward(dy, x, weight, stats, spec, need_dx, kept)


@norm_backward.register_fake
def _norm_backward_fake(dy: Tensor, x: Tensor, *_: Any) -> tuple[Tensor, Tensor, Tensor]:
    c = x.shape[1]
    dtype = _compute(x).dtype
    return torch.empty_like(x), x.new_empty(c, dtype=dtype), x.new_empty(c, dtype=dtype)


def _norm_backward_setup(ctx: Any, inputs: tuple[Any, ...], output: object) -> None:
    dy, x, weight, _, _, eps, p, centered, group_size, noise_key, noise, _ = inputs
    ctx.save_for_backward(dy, x, weight, noise_key)
    ctx.variant = (eps, p, centered, group_size, noise)


def _norm_double_backward(
    ctx: Any, ddx: Tensor | None, ddweight: Tensor | None, ddbias: Tensor | None
) -> tuple[Tensor | None, ...]:
    """Gradients of (dx, dweight, dbias) with respect to (dy, x, weight): the torch-op backward
    re-derived and differentiated (third derivatives too when the graph is wanted)."""
    dy, x, weight, noise_key = ctx.saved_tensors
    eps, p, centered, group_size, noise = ctx.variant
    spec = _variant_spec(eps, p, centered, group_size, noise_key, noise, key_as_ints=False)
    needs = ctx.needs_input_grad[:3]
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        g = _compute(dy).detach().requires_grad_()
        xc = _compute(x).detach().requires_grad_()
        w = None if weight is None else weight.detach().requires_grad_()
        b = torch.zeros(x.shape[1], dtype=xc.dtype, device=x.device, requires_grad=True)
        grads = kernels.torch_op_backward((True, w is not None, True), spec, xc, w, b, g)
        outs: list[Tensor] = []
        dds: list[Tensor] = []
        for out, dd in zip(grads, (ddx, ddweight, ddbias), strict=True):
            if out is not None and dd is not None:
                outs.append(out)
                dds.append(dd)
        leaves = (g, xc, w)
        inputs = [t for t, need in zip(leaves, needs, strict=True) if need and t is not None]
        found: list[Tensor | None] = [None] * len(inputs)
        if outs and inputs:
            found = list(
                torch.autograd.grad(outs, inputs, dds, allow_unused=True, create_graph=create_graph)
            )
    taken = iter(found)
    result = [
        next(taken) if need and t is not None else None
        for t, need in zip(leaves, needs, strict=True)
    ]
    d_dy, d_x, d_w = (
        None if r is None else r.to(like.dtype)
        for r, like in zip(result, (dy, x, weight if weight is not None else x), strict=True)
    )
    return (d_dy, d_x, d_w, *(None,) * 9)


norm_backward.register_autograd(_norm_double_backward, setup_context=_norm_backward_setup)


def normalize(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, spec: ops.NormSpec
) -> tuple[Tensor, ops.GroupStats]:
    """Training-mode lp, Ghost or noisy BatchNorm (``spec``, no renorm) through
    ``bnlab::norm_train``: (y, per-group statistics). Raises ValueError when a (virtual)
    batch has one value per channel."""
    n = x.shape[0]
    v = n if spec.virtual_batch_size is None else min(spec.virtual_batch_size, n)
    counts = ops.group_counts(n, v, x.numel() // max(1, n * x.shape[1]))
    ops.check_batch_size(min(counts), x)
    key = None
    if spec.noise is not None:
        words = spec.noise.key
        key = (
            torch.stack([torch.as_tensor(w, dtype=torch.int64) for w in words]).to(x.device)
            if isinstance(words[0], Tensor)
            else torch.tensor(words, dtype=torch.int64, device=x.device)
        )
    noise = [] if spec.noise is None else list(spec.noise.spec.constants)
    group_size = 0 if spec.virtual_batch_size is None else v
    y, stats, _ = norm_train(
        x, weight, bias, spec.eps, spec.p, spec.centered, group_size, key, noise
    )
    return y, ops.GroupStats(stats[MEAN], stats[SPREAD], counts)


# --- eval ------------------------------------------------------------------------------------


@torch.library.custom_op("bnlab::batch_norm_eval", mutates_args=())
def batch_norm_eval(
    x: Tensor,
    mean: Tensor,
    spread: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    is_var: bool,
) -> Tensor:
    """y = weight (x - mean) / s + bias, s = sqrt(spread + eps) (``is_var``) or spread. This body
    is the torch-op implementation (every device but the CPU)."""
    return _eval_formulas(x, mean, spread, weight, bias, eps, is_var)


def _eval_formulas(
    x: Tensor,
    mean: Tensor,
    spread: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    is_var: bool,
) -> Tensor:
    xc = _compute(x)
    return ops.normalize(
        xc, mean.to(xc.dtype), _eval_scale(spread, eps, is_var, xc), weight, bias
    ).to(x.dtype)


def _eval_scale(spread: Tensor, eps: float, is_var: bool, like: Tensor) -> Tensor:
    spread = spread.to(like.dtype)
    return torch.sqrt(spread + eps) if is_var else spread


@batch_norm_eval.register_kernel("cpu")
def _batch_norm_eval_cpu(
    x: Tensor,
    mean: Tensor,
    spread: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    is_var: bool,
) -> Tensor:
    if not _on_loops(x):
        return _eval_formulas(x, mean, spread, weight, bias, eps, is_var)
    with torch.no_grad():
        return kernels.eval_normalize(x, mean, spread, weight, bias, eps, is_var)


@batch_norm_eval.register_fake
def _batch_norm_eval_fake(
    x: Tensor,
    mean: Tensor,
    spread: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    is_var: bool,
) -> Tensor:
    _offer_inductor_decompositions()
    return torch.empty_like(x)


def _eval_setup(ctx: Any, inputs: tuple[object, ...], output: object) -> None:
    x, mean, spread, weight, _, eps, is_var = inputs
    ctx.save_for_backward(x, mean, spread, weight)
    ctx.eps, ctx.is_var = eps, is_var


def _eval_backward(
    ctx: Any, dy: Tensor
) -> tuple[Tensor | None, None, None, Tensor | None, Tensor | None, None, None]:
    """A per-channel affine map: torch ops, so differentiable again."""
    x, mean, spread, weight = ctx.saved_tensors
    needs = ctx.needs_input_grad
    xc = _compute(x)
    inv = ops.channel_view(1.0 / _eval_scale(spread, ctx.eps, ctx.is_var, xc), xc)
    dims = ops.reduce_dims(x)
    dx = dweight = dbias = None
    if needs[0]:
        gain = inv if weight is None else inv * ops.channel_view(weight.to(xc.dtype), xc)
        dx = (_compute(dy) * gain).to(x.dtype)
    if needs[3]:
        x_hat = (xc - ops.channel_view(mean.to(xc.dtype), xc)) * inv
        dweight = (_compute(dy) * x_hat).sum(dims).to(weight.dtype)
    if needs[4]:
        dbias = dy.sum(dims)
    return dx, None, None, dweight, dbias, None, None


batch_norm_eval.register_autograd(_eval_backward, setup_context=_eval_setup)


# --- what bnlab.functional calls -------------------------------------------------------------


def batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
) -> Tensor:
    """Training-mode BatchNorm through ``bnlab::batch_norm_train``; the running buffers (if
    given) move by ``momentum`` towards the batch mean and unbiased variance, in place."""
    ops.check_batch_size(x.numel() // x.shape[1], x)
    y, stats = batch_norm_train(x, weight, bias, eps)
    if running_mean is not None or running_var is not None:
        count = x.numel() // x.shape[1]
        batch = ops.GroupStats(stats[MEAN], stats[SPREAD], (count,))
        update = ops.RunningUpdate(running_mean, running_var, momentum, ops.VARIANCE)
        ops.update_from_stats(update, batch, ops.NormSpec(eps))
    return y


# --- torch.compile with inductor -------------------------------------------------------------

_decompositions_offered = False


def _offer_inductor_decompositions() -> None:
    """Let inductor decompose BatchNorm's operators into their torch-op formulas,
    which it fuses with the neighbouring ops: called from the fake implementations, which run
    when Dynamo first traces an operator, before inductor picks its decomposition table. An
    opaque operator call made a compiled vgg_digits training step 2.6x torch.nn's (one thread);
    decomposed, 1.3x. Other backends (aot_eager, export) keep the operators, and so does
    inductor for the variants' pair (its backward's formulas come from torch.func, which does
    not trace under inductor's fake tensors). Importing inductor
    here costs a compiling process 1.4 s once, and nothing otherwise."""
    global _decompositions_offered
    if _decompositions_offered:
        return
    _decompositions_offered = True
    from torch._inductor import decomposition

    def backward(dy: Tensor, x: Tensor, weight: Tensor | None, stats: Tensor, *args: Any) -> Any:
        return _backward_formulas(dy, x, weight, stats, args[-1])

    table = {
        torch.ops.bnlab.batch_norm_train.default: _train_formulas,
        torch.ops.bnlab.batch_norm_backward.default: backward,
        torch.ops.bnlab.batch_norm_eval.default: _eval_formulas,
    }
    for op, formulas in table.items():
        decomposition.decompositions.setdefault(op, formulas)
    decomposition.fast_random_decomps.cache_clear()  # a cached copy of the table
