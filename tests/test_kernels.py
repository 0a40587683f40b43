"""The fused CPU kernels: against the float64 reference and the torch-op path, both layouts."""

from __future__ import annotations

import inspect
import math
import subprocess
import sys
import textwrap
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bnlab.functional as F
from bnlab.functional import kernels, noise, ops
from bnlab.functional import reference as R
from bnlab.functional.kernels import native
from helpers import TOL, rel_err

pytestmark = pytest.mark.skipif(not kernels.numba_available(), reason="numba not installed")

VARIANTS = ["bn", "l1", "l2", "linf", "l1_centered", "linf_centered", "ghost", "renorm", "noisy"]
"""lp: "l1", "l2", "linf" the paper's (un-centred) form, "_centered" the spread of x - mean."""
GLUES = ["native", "function"]
"""How the kernels are called: the C++ autograd node (renorm always takes the other), or the
Python autograd.Function (where the C++ glue cannot be built)."""
PYTHON_NODE = "FusedTrainNormBackward"


def _glue(name: str):
    return native.disabled() if name == "function" else nullcontext()


def _expected_node(glue: str, spec: ops.NormSpec) -> str:
    if glue == "native" and spec.renorm is None and native.active():
        return native.NODE_NAME
    return PYTHON_NODE


def _node(y: torch.Tensor) -> str:
    return y.grad_fn.name() if y.grad_fn.name() == native.NODE_NAME else type(y.grad_fn).__name__


def _spec(
    variant: str, c: int, dtype: torch.dtype, seed: int = 0, far: bool = False
) -> ops.NormSpec:
    """``far``: renorm's running statistics so far from the batch that r and d sit at their
    clip limits, where treating them as constants is the exact derivative (for gradcheck)."""
    eps = 1e-5
    if variant.startswith("l"):
        p = {"l1": 1.0, "l2": 2.0, "linf": math.inf}[variant.split("_")[0]]
        return ops.NormSpec(eps, p, centered=variant.endswith("_centered"))
    if variant == "ghost":
        return ops.NormSpec(eps, virtual_batch_size=3)
    if variant == "renorm":
        g = torch.Generator().manual_seed(seed)
        mean, var = (
            torch.randn(c, generator=g, dtype=dtype),
            torch.rand(c, generator=g, dtype=dtype),
        )
        if far:
            mean, var = mean - 1000, var * 1e4 + 1e4
        running = ops.Renorm(mean, var * 4 + 0.05, r_max=1.5, d_max=0.5)
        return ops.NormSpec(eps, renorm=running)
    if variant == "noisy":
        draw = noise.draw(F.NoiseSpec(), torch.device("cpu"), torch.Generator().manual_seed(seed))
        return ops.NormSpec(eps, noise=draw)
    return ops.NormSpec(eps)


def _both_paths(x, weight, bias, spec, dy, glue="native"):
    """(y, dx, dweight, dbias, stats) on the kernel path (called through ``glue``) and on the
    torch-op path."""
    results = []
    for enabled in (True, False):
        xs = x.detach().clone().requires_grad_()
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            xs = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        w, b = weight.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
        with F.use_kernels(enabled), _glue(glue):
            y, stats = F.normalize_train(xs, w, b, spec)
            if enabled:
                assert _node(y) == _expected_node(glue, spec)
            dx, dw, db = torch.autograd.grad(y, (xs, w, b), dy)
        results.append((y, dx, dw, db, stats))
    return results


def _reference(x, gamma, beta, spec, dy):
    """Float64 reference forward and backward (None where the reference has no backward)."""
    xd, dyd = x.detach().double().numpy(), dy.double().numpy()
    if spec.noise is not None:  # Algorithm 1 from the same draws
        n = spec.noise.spec
        draws = R.noise_draws(xd.shape, spec.noise.key, n.n_mu, n.n_sigma)
        y, cache, s = R.noisy_batch_norm_forward(xd, gamma, beta, draws, n.r_mu, n.r_sigma)
        return y, R.noisy_batch_norm_backward(dyd, cache, s)
    chunk = spec.virtual_batch_size or xd.shape[0]
    ys, dxs, dgs, dbs = [], [], [], []
    for start in range(0, xd.shape[0], chunk):
        xc, dyc = xd[start : start + chunk], dyd[start : start + chunk]
        if spec.renorm is not None:
            rn = spec.renorm
            y, _, _ = R.batch_renorm_forward(
                xc, gamma, beta, rn.running_mean.double().numpy(),
                rn.running_var.double().numpy(), spec.eps, rn.r_max, rn.d_max,
            )  # fmt: skip
            ys.append(y)
            continue
        y, cache = R.lp_batch_norm_forward(
            xc, gamma, beta, spec.eps, spec.p, centered=spec.centered
        )
        dx, dg, db = R.lp_batch_norm_backward(dyc, cache)
        ys.append(y)
        dxs.append(dx)
        dgs.append(dg)
        dbs.append(db)
    y = np.concatenate(ys)
    if not dxs:
        return y, None
    return y, (np.concatenate(dxs), sum(dgs), sum(dbs))


@st.composite
def cases(draw):
    rank = draw(st.sampled_from([0, 1, 2, 3]))
    c = draw(st.integers(1, 5))
    n = draw(st.integers(2, 7))
    spatial = tuple(draw(st.integers(1, 4)) for _ in range(rank))
    variant = draw(st.sampled_from(VARIANTS))
    if variant.startswith("linf"):  # at least 3 values per channel, so the arg-max is unique
        n = max(n, 3)
    if variant == "ghost" and n % 3 == 1 and math.prod(spatial) == 1:
        n += 1  # the last virtual batch of 3 needs more than one value per channel
    return {
        "shape": (n, c, *spatial),
        "variant": variant,
        "dtype": draw(st.sampled_from([torch.float32, torch.float64])),
        "channels_last": rank in (2, 3) and draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
        "glue": draw(st.sampled_from(GLUES)),
    }


def _inputs(case):
    shape, dtype = case["shape"], case["dtype"]
    rng = np.random.default_rng(case["seed"])
    c = shape[1]
    gamma, beta = rng.uniform(0.5, 2, size=c), rng.normal(size=c)
    scale = rng.uniform(0.5, 3.0, size=c).reshape((1, c) + (1,) * (len(shape) - 2))
    x = torch.from_numpy(rng.normal(1.0, 1.0, size=shape) * scale).to(dtype)
    if case["channels_last"]:
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    dy = torch.from_numpy(rng.normal(size=shape)).to(dtype)
    weight, bias = torch.from_numpy(gamma).to(dtype), torch.from_numpy(beta).to(dtype)
    return x, weight, bias, dy, gamma, beta


@settings(max_examples=60)
@given(case=cases())
def test_kernel_path_matches_reference_and_torch_op_path(case):
    x, weight, bias, dy, gamma, beta = _inputs(case)
    spec = _spec(case["variant"], x.shape[1], x.dtype, case["seed"])
    tol = TOL[x.dtype]
    (y, dx, dw, db, stats), (y_t, dx_t, dw_t, db_t, stats_t) = _both_paths(
        x, weight, bias, spec, dy, case["glue"]
    )
    assert y.shape == x.shape and y.stride() == x.stride()
    for ours, theirs in ((y, y_t), (dx, dx_t), (dw, dw_t), (db, db_t)):
        assert rel_err(ours, theirs) <= tol
    assert rel_err(stats.mean, stats_t.mean) <= tol
    assert rel_err(stats.spread, stats_t.spread) <= tol
    assert stats.counts == stats_t.counts
    y_ref, grads_ref = _reference(x, gamma, beta, spec, dy)
    assert rel_err(y, y_ref) <= tol
    if grads_ref is not None:
        for ours, ref in zip((dx, dw, db), grads_ref, strict=True):
            assert rel_err(ours, ref) <= tol


@settings(max_examples=20)
@given(case=cases())
def test_eval_kernel_matches_reference_and_torch_op_path(case):
    x, weight, bias, _, gamma, beta = _inputs(case)
    c = x.shape[1]
    mean, var = torch.randn(c, dtype=x.dtype), torch.rand(c, dtype=x.dtype) + 0.1
    outs = []
    for enabled in (True, False):
        with F.use_kernels(enabled), _glue(case["glue"]):
            outs.append(F.batch_norm(x, mean, var, weight, bias, training=False, eps=1e-3))
    ref = R.batch_norm_inference(
        x.double().numpy(), mean.double().numpy(), var.double().numpy(), gamma, beta, 1e-3
    )
    assert outs[0].stride() == x.stride()
    assert rel_err(outs[0], outs[1]) <= TOL[x.dtype]
    assert rel_err(outs[0], ref) <= TOL[x.dtype]


def test_eval_kernel_backward_matches_torch_op_path():
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    mean, var = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    with F.use_kernels(True):
        assert torch.autograd.gradcheck(
            lambda x, w, b: F.batch_norm(x, mean, var, w, b, training=False), (x, w, b)
        )


@pytest.mark.parametrize("glue", GLUES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck_and_gradgradcheck_through_the_kernel_path(variant, channels_last, glue):
    torch.manual_seed(0)
    x = torch.randn(6, 3, 2, 3, dtype=torch.float64) * 2 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64).requires_grad_()
    spec = _spec(variant, 3, torch.float64, far=True)

    def f(x, w, b):
        return F.normalize_train(x, w, b, spec)[0]

    with F.use_kernels(True), _glue(glue):
        assert _node(f(x, w, b)) == _expected_node(glue, spec)
        assert torch.autograd.gradcheck(f, (x, w, b))
        assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
def test_large_mean_channel_stays_accurate_in_float32(channels_last, p, centered):
    rng = np.random.default_rng(0)
    x64 = rng.normal(size=(16, 3, 6, 6))
    x64[:, 1] += 1e4
    x = torch.from_numpy(x64).float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x64 = x.double().numpy()  # the reference sees the same float32 values
    dy = torch.from_numpy(rng.normal(size=x.shape)).float()
    gamma, beta = np.ones(3), np.zeros(3)
    xs = x.clone().requires_grad_()
    with F.use_kernels(True):
        y, _ = F.normalize_train(xs, None, None, ops.NormSpec(1e-5, p, centered=centered))
    (dx,) = torch.autograd.grad(y, xs, dy)
    y_ref, cache = R.lp_batch_norm_forward(x64, gamma, beta, 1e-5, p, centered=centered)
    dx_ref, _, _ = R.lp_batch_norm_backward(dy.double().numpy(), cache)
    assert rel_err(y, y_ref) <= 1e-4
    assert rel_err(dx, dx_ref) <= 1e-4


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_constant_channel_is_finite_and_nan_stays_in_its_channel(channels_last, variant):
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(size=(6, 4, 3, 3))).float()
    x[:, 2] = 3.0
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    spec = _spec(variant, 4, torch.float32)
    dy = torch.from_numpy(rng.normal(size=x.shape)).float()
    with F.use_kernels(True):
        xs = x.clone().requires_grad_()
        y, _ = F.normalize_train(xs, None, None, spec)
        (dx,) = torch.autograd.grad(y, xs, dy)
        assert torch.isfinite(y).all() and torch.isfinite(dx).all()
        poisoned = x.clone()
        poisoned[2, 0, 1, 1] = float("nan")
        ps = poisoned.requires_grad_()
        y_nan, _ = F.normalize_train(ps, None, None, spec)
        (dx_nan,) = torch.autograd.grad(y_nan, ps, dy)
    assert torch.isnan(y_nan[:, 0]).any()
    assert torch.equal(y_nan[:, 1:], y[:, 1:])
    assert torch.equal(dx_nan[:, 1:], dx[:, 1:])


def _assert_parallel(x: torch.Tensor) -> None:
    plan = kernels.plan_for(kernels.readable(x), x.shape[0])
    assert plan.parallel and plan.threads == 2


@pytest.mark.parametrize("glue", GLUES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("variant", ["bn", "l1", "l2", "linf", "linf_centered", "ghost", "noisy"])
@pytest.mark.parametrize("channels", [2, 8])
def test_parallel_passes_match_torch_op_path(channels, channels_last, variant, glue, two_threads):
    """Large enough for the thread pool. With 2 channels the batch is split into blocks; with 8
    channels, or 14 ghost batches, the planar loops run one fused task per (group, channel)."""
    torch.manual_seed(3)
    x = torch.randn(40, channels, 24, 20) * 3 + 5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    _assert_parallel(x)
    if not channels_last:
        plan = kernels.plan_for(kernels.readable(x), 3 if variant == "ghost" else 40)
        assert (plan.blocks == 1) == (channels == 8 or variant == "ghost")
    spec = _spec(variant, channels, torch.float32)
    weight, bias = torch.rand(channels) + 0.5, torch.randn(channels)
    ours, torch_op = _both_paths(x, weight, bias, spec, torch.randn_like(x), glue)
    for a, b in zip(ours[:4], torch_op[:4], strict=True):
        assert rel_err(a, b) <= 1e-4  # sums over 38400 float32 values per channel


@pytest.mark.parametrize("glue", GLUES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["planar", "rows", "channels_last"])
def test_eval_kernel_on_the_thread_pool_with_a_large_mean_matches_the_reference(
    layout, dtype, glue, two_threads
):
    """Large enough for the parallel eval loops; channel 0 sits at mean 1e4 (running_mean too),
    one channel is constant, and the running statistics are float64 buffers."""
    torch.manual_seed(5)
    shape = (64, 4, 12, 12) if layout != "rows" else (512, 4, 4, 4)
    x = torch.randn(shape, dtype=dtype) * torch.tensor([1.0, 2.0, 0.0, 0.5], dtype=dtype).view(
        1, 4, 1, 1
    )
    x[:, 0] += 1e4
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    _assert_parallel(x)
    mean = torch.tensor([1e4, 0.1, -0.2, 0.0], dtype=torch.float64)
    var = torch.tensor([1.0, 4.0, 0.0, 0.25], dtype=torch.float64)
    weight, bias = torch.rand(4, dtype=dtype) + 0.5, torch.randn(4, dtype=dtype)
    with F.use_kernels(True), _glue(glue):
        y = F.batch_norm(x, mean, var, weight, bias, training=False, eps=1e-3)
    ref = R.batch_norm_inference(
        x.double().numpy(), mean.numpy(), var.numpy(), weight.double().numpy(),
        bias.double().numpy(), 1e-3,
    )  # fmt: skip
    assert y.dtype == dtype and y.stride() == x.stride()
    assert rel_err(y, ref) <= TOL[dtype]


def test_noise_is_the_same_on_both_paths_and_for_any_thread_count():
    import numba

    x = torch.randn(16, 3, 30, 30)
    draw = noise.draw(F.NoiseSpec(), x.device, torch.Generator().manual_seed(4))
    spec = ops.NormSpec(1e-5, noise=draw)
    with F.use_kernels(False):
        y_torch, _ = F.normalize_train(x, None, None, spec)
    outputs = []
    threads = numba.get_num_threads()
    try:
        for n in (1, threads):
            numba.set_num_threads(n)
            with F.use_kernels(True):
                outputs.append(F.normalize_train(x, None, None, spec)[0])
    finally:
        numba.set_num_threads(threads)
    assert torch.equal(outputs[0], outputs[1])
    assert rel_err(outputs[0], y_torch) <= 1e-5
    clean, _ = F.normalize_train(x, None, None, ops.NormSpec(1e-5))
    assert (outputs[0] - clean).abs().mean() > 0.1  # E|m| alone is about 0.25


def test_hash_is_lowbias32_keyed():
    """noise.hash32 (int64 tensor arithmetic) against lowbias32 written on Python integers."""

    def lowbias32(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    key = (0x12345678, 0x7EDCBA98)
    counters = [0, 1, 2, 0xFFFF, 2**31 + 5, 2**32 - 1, 2**32 + 3]
    ours = noise.hash32(torch.tensor(counters), key).tolist()
    expected = [(lowbias32((c & 0xFFFFFFFF) ^ key[0]) + key[1]) & 0xFFFFFFFF for c in counters]
    assert ours == expected
    assert lowbias32(1) != 1 and len(set(ours)) == len(ours)


def test_noise_goes_with_batch_norm_statistics_only():
    draw = noise.draw(F.NoiseSpec(), torch.device("cpu"), torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"noise goes with BatchNorm's statistics \(p = 2\)"):
        ops.NormSpec(1e-5, 1.0, noise=draw)


@pytest.mark.parametrize("channels", [1, 7, 300])
def test_channel_noise_parameters_are_the_same_bits_on_both_paths_and_in_range(channels):
    from bnlab.functional.kernels.loops import noise_draws

    spec = F.NoiseSpec(n_mu=0.7, n_sigma=2.5, r_mu=0.2, r_sigma=0.1)
    draw = noise.draw(spec, torch.device("cpu"), torch.Generator().manual_seed(channels))
    mu, sigma = draw.channel_params(channels)
    conf = np.array(spec.constants)
    params = noise_draws._noise_params(conf, np.array(draw.key, dtype=np.uint64), channels)
    assert torch.equal(torch.from_numpy(params[0]), mu)
    assert torch.equal(torch.from_numpy(params[1]), sigma)
    assert (params[2] == 0.2).all() and (params[3] == 0.1).all()
    assert mu.abs().max() < 0.7 and sigma.min() > 1.0 and sigma.max() < 2.5
    if channels > 1:
        assert mu.unique().numel() == channels and sigma.unique().numel() == channels
    draws = R.noise_draws((2, channels), draw.key, spec.n_mu, spec.n_sigma)
    assert rel_err(mu, draws.mu_t) <= 1e-15 and rel_err(sigma, draws.sigma_t) <= 1e-15
    assert noise_draws._noise_params(np.empty(0), np.zeros(2, np.uint64), channels).shape == (4, 0)


@pytest.mark.parametrize("glue", GLUES)
def test_backward_saves_only_input_parameters_and_per_channel_statistics(glue):
    """Saved for backward: x itself, weight and bias (no x_hat copy); the (5, G, C) statistics
    are kept outside autograd's saved tensors on both glues."""
    x = torch.randn(8, 4, 5, 5, requires_grad=True)
    w, b = torch.ones(4, requires_grad=True), torch.zeros(4, requires_grad=True)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with (
        F.use_kernels(True),
        _glue(glue),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        y, _ = F.normalize_train(x, w, b, ops.NormSpec(1e-5))
    assert _node(y) == _expected_node(glue, ops.NormSpec(1e-5))
    assert len(saved) == 3 and saved[0].data_ptr() == x.data_ptr()
    assert sum(t.numel() for t in saved) == x.numel() + 8


def test_use_kernels_switches_the_path():
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    kernel_nodes = (PYTHON_NODE, native.NODE_NAME)
    with F.use_kernels(False):
        assert _node(F.normalize_train(x, None, None, ops.NormSpec(1e-5))[0]) not in kernel_nodes
    with F.use_kernels(True):
        assert F.kernels_enabled()
        y, _ = F.normalize_train(x, None, None, ops.NormSpec(1e-5))
        assert _node(y) in kernel_nodes


def test_ghost_batch_of_one_value_per_channel_raises():
    with F.use_kernels(True), pytest.raises(ValueError, match="more than 1 value per channel"):
        F.normalize_train(torch.randn(5, 3), None, None, ops.NormSpec(1e-5, virtual_batch_size=2))


def test_importing_bnlab_imports_no_numba():
    code = (
        "import sys, bnlab, bnlab.functional, bnlab.nn, bnlab.functional.kernels; "
        "print('numba' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_first_kernel_use_keeps_torch_thread_count():
    """numba's OpenMP pool resets the process-wide OpenMP thread count torch reads."""
    code = (
        "import torch; torch.set_num_threads(1); import bnlab.nn as bnn; "
        "bnn.BatchNorm2d(4)(torch.randn(8, 4, 3, 3)); print(torch.get_num_threads())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"


def _huge_page_advised(t: torch.Tensor) -> bool:
    """Whether t's whole 2 MiB pages lie in mappings advised MADV_HUGEPAGE ("hg" in VmFlags)."""
    first = -(-t.data_ptr() // kernels.HUGE_PAGE) * kernels.HUGE_PAGE
    last = (t.data_ptr() + t.numel() * t.element_size()) // kernels.HUGE_PAGE * kernels.HUGE_PAGE
    advised, start, end = [], 0, 0
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(a, 16) for a in head.split("-"))
            elif head == "VmFlags:" and "hg" in line.split()[1:]:
                advised.append((start, end))
    covered = first
    for start, end in sorted(advised):
        if start <= covered < end:
            covered = end
    return last > first and covered >= last


@pytest.mark.parametrize("channels_last", [False, True])
def test_large_outputs_are_advised_to_huge_pages_and_stay_correct(channels_last, monkeypatch):
    """y and dx of 4 MiB and more are advised over their whole 2 MiB pages; smaller ones are
    not; the numbers do not change. The Python glue's calls are recorded; the native glue's
    advice is read back from /proc/self/smaps."""
    advised: list[tuple[int, int, int]] = []

    def record(start: int, length: int, advice: int) -> int:
        advised.append((start, length, advice))
        return 0

    monkeypatch.setattr(kernels.plan, "_madvise", record)
    torch.manual_seed(6)
    x = torch.randn(64, 8, 48, 48) * 2 + 3  # 4.7 MB of float32
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.rand(8) + 0.5, torch.randn(8)
    ours, torch_op = _both_paths(
        x, weight, bias, ops.NormSpec(1e-5), torch.randn_like(x), "function"
    )
    for a, b in zip(ours[:4], torch_op[:4], strict=True):
        assert rel_err(a, b) <= 1e-5
    y, dx = ours[0], ours[1]
    assert y.stride() == x.stride() and dx.stride() == x.stride()
    assert len(advised) == 2  # y, then dx
    for (start, length, advice), t in zip(advised, (y, dx), strict=True):
        first, end = t.data_ptr(), t.data_ptr() + t.numel() * 4
        assert advice == 14 and start % kernels.HUGE_PAGE == 0 and length % kernels.HUGE_PAGE == 0
        assert first <= start and start + length <= end and end - (start + length) < 2**21
    advised.clear()
    small = torch.randn(64, 8, 8, 8)
    _both_paths(small, weight, bias, ops.NormSpec(1e-5), torch.randn_like(small), "function")
    assert advised == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_native_glue_advises_large_outputs_to_huge_pages():
    """Read back from /proc/self/smaps in a fresh process, where no earlier output can have
    left advice on the addresses: torch's own tensor of the same size (the control) is not
    advised, the native glue's y and dx are."""
    if native.active() is None:
        pytest.skip("native glue not built")
    imports = "import torch, bnlab.nn as bnn\nfrom bnlab.functional import kernels\n"
    code = (
        imports
        + inspect.getsource(_huge_page_advised)
        + textwrap.dedent(
            """
        from bnlab.functional.kernels import native
        x = torch.randn(64, 8, 48, 48, requires_grad=True)
        control = torch.randn(64, 8, 48, 48)
        y = bnn.BatchNorm2d(8)(x)
        (dx,) = torch.autograd.grad(y, x, torch.randn_like(y))
        print(y.grad_fn.name() == native.NODE_NAME, _huge_page_advised(control),
              _huge_page_advised(y), _huge_page_advised(dx))
        """
        )
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False", "True", "True"]
