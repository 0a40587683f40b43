"""The vectorized pieces of the kernels: 32-bit noise hashing in batches, the noisy gradient
kept in dx between the backward passes, the row layout's fused arg-max for p = inf."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import bnlab.functional as F
from bnlab.functional import kernels, noise, ops
from bnlab.functional import reference as R
from helpers import TOL, rel_err

pytestmark = pytest.mark.skipif(not kernels.numba_available(), reason="numba not installed")

KEY = (0x9E3779B9, 0x7F4A7C15)


def _noise_draws():
    from bnlab.functional.kernels.loops import noise_draws

    return noise_draws


def _hash_reference(counters: np.ndarray) -> np.ndarray:
    return noise.hash32(torch.from_numpy(counters.astype(np.int64)), KEY).numpy()


@pytest.mark.parametrize("start", [0, 2**32 - 100, 3 * 2**32 + 17])
def test_hash_run_matches_torch_hash_across_the_32_bit_wrap(start):
    draws = _noise_draws()
    h = np.empty(300, dtype=np.uint32)
    draws._hash_run(start, 300, np.array(KEY, dtype=np.uint64), h)
    expected = _hash_reference(np.arange(start, start + 300))
    np.testing.assert_array_equal(h.astype(np.int64), expected)


def test_tile_counters_are_the_logical_counters_past_the_32_bit_wrap():
    """Row layout with k = 3 columns per channel and 2^31 rows: a tile's counters plus its first
    row times k are c * N * S + n * S + s (mod 2^32, as the kernels and noise.hash32 take them)."""
    draws = _noise_draws()
    k, rows, columns = 3, 2**31, 12
    base = draws._column_base(columns, k, rows)
    tile_rows = 4
    counters = draws._tile_counters(base, k, columns, tile_rows).astype(np.int64)
    first = rows - 5
    j = np.tile(np.arange(columns), tile_rows)
    row = first + np.repeat(np.arange(tile_rows), columns)
    logical = (j // k) * (rows * k) + row * k + j % k  # c * N * S + n * S + s
    np.testing.assert_array_equal((counters + first * k) % 2**32, logical % 2**32)
    hashed = [
        draws._hash32(np.uint32((c + first * k) % 2**32), *map(np.uint32, KEY)) for c in counters
    ]
    np.testing.assert_array_equal(np.array(hashed, dtype=np.int64), _hash_reference(logical))


def _noisy_spec(
    channels: int, dtype: torch.dtype, seed: int = 0, virtual_batch_size: int | None = None
) -> ops.NormSpec:
    gen = torch.Generator().manual_seed(seed)
    draw = noise.draw(F.NoiseSpec(), torch.device("cpu"), gen)
    return ops.NormSpec(1e-5, noise=draw, virtual_batch_size=virtual_batch_size)


def _train(x, weight, bias, spec, dy, kernels_on, need_dx=True):
    xs = x.detach().clone(memory_format=torch.preserve_format).requires_grad_(need_dx)
    w, b = weight.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    with F.use_kernels(kernels_on):
        y, _ = F.normalize_train(xs, w, b, spec)
    inputs = (xs, w, b) if need_dx else (w, b)
    return (y, *torch.autograd.grad(y, inputs, dy))


@pytest.mark.parametrize(
    "shape, channels_last, virtual_batch_size",
    [
        ((3, 2, 23, 25), False, None),  # planar rows of 575 values: two batches of 256, a tail
        ((2, 300, 3, 3), True, None),  # rows of 300 channels: one row per tile
        ((4, 70, 2, 2), False, None),  # rows (N, C * S) of 280 columns, 4 per channel
        ((5, 24, 7, 4), True, None),  # 140 rows of 24 channels: tiles of 21 rows, a partial one
        ((9, 5, 3, 3), False, None),  # 9 rows of 45 columns: one partial tile of 11 rows
        ((7, 24, 5, 5), True, 3),  # ghost groups of 75 rows: group ends inside tiles
        ((7, 3, 9, 9), False, 2),  # planar ghost groups
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_noisy_kernels_match_torch_op_path_past_a_hash_batch(
    shape, channels_last, virtual_batch_size, dtype
):
    """Noise on the kernels (hashed in batches of 256 on planar rows, on tiles of whole rows
    in the row layout) against the torch-op path, outputs and gradients."""
    torch.manual_seed(0)
    x = (torch.randn(shape, dtype=dtype) * 2 + 3).contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    c = shape[1]
    weight, bias = torch.rand(c, dtype=dtype) + 0.5, torch.randn(c, dtype=dtype)
    dy = torch.randn(shape, dtype=dtype)
    spec = _noisy_spec(c, dtype, virtual_batch_size=virtual_batch_size)
    ours = _train(x, weight, bias, spec, dy, True)
    torch_op = _train(x, weight, bias, spec, dy, False)
    for a, b in zip(ours, torch_op, strict=True):
        assert rel_err(a, b) <= 10 * TOL[dtype]


@pytest.mark.parametrize("channels_last", [False, True])
def test_noisy_parameter_gradients_without_dx_match_those_with_dx(channels_last):
    """Without dx the sums pass does not keep the noisy gradient (no dx to keep it in)."""
    torch.manual_seed(1)
    x = torch.randn(8, 4, 9, 9, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.rand(4, dtype=x.dtype) + 0.5, torch.randn(4, dtype=x.dtype)
    dy = torch.randn_like(x)
    spec = _noisy_spec(4, x.dtype, seed=2)
    _, _, dw_full, db_full = _train(x, weight, bias, spec, dy, True)
    _, dw, db = _train(x, weight, bias, spec, dy, True, need_dx=False)
    assert torch.equal(dw, dw_full) and torch.equal(db, db_full)


def _tied_input(first: tuple[int, int], second: tuple[int, int], shape) -> torch.Tensor:
    """Float64 (N, 2, H, W): channel 0 plain, channel 1 with mean 0 and its largest |x - mean|
    a tie, +3 at ``first`` and -3 at ``second`` ((sample, flat spatial) positions)."""
    n, _, h, w = shape
    values = np.random.default_rng(0).uniform(-1, 1, size=(n, h * w))
    values[first], values[second] = 3.0, -3.0
    rest = np.ones(values.shape, dtype=bool)
    rest[first] = rest[second] = False
    values[rest] -= values[rest].mean()
    plain = np.random.default_rng(1).normal(size=(n, h * w))
    return torch.from_numpy(np.stack([plain, values], axis=1).reshape(n, 2, h, w))


@pytest.mark.parametrize(
    "shape, channels_last, first, second",
    [
        ((6, 2, 4, 4), False, (0, 15), (1, 0)),  # rows (N, C S): later column, earlier row
        ((6, 2, 4, 4), False, (2, 3), (2, 7)),  # same row, two columns of the channel
        ((6, 2, 4, 4), True, (1, 9), (0, 2)),  # channels-last: -3 comes first
        ((6, 2, 4, 4), True, (0, 10), (0, 9)),  # within one four-row sweep (short rows)
        ((6, 2, 4, 4), True, (0, 9), (0, 11)),  # the other way round
        ((40, 2, 24, 24), True, (3, 1), (35, 2)),  # parallel row blocks, the tie across them
    ],
)
@pytest.mark.parametrize("centered", [True, False])
def test_rows_linf_arg_max_takes_the_first_tied_value(
    shape, channels_last, first, second, centered
):
    """Centred: the tie is of |x - mean|; the paper's form: of |x| (+3 and -3 exactly)."""
    x = _tied_input(first, second, shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mean = x[:, 1].mean().item()
    assert abs(3.0 - mean) == abs(-3.0 - mean)  # a real tie in float64
    weight, bias = torch.tensor([1.5, 0.7], dtype=x.dtype), torch.tensor([0.2, -1.0], dtype=x.dtype)
    dy = torch.randn(shape, dtype=x.dtype, generator=torch.Generator().manual_seed(5))
    spec = ops.NormSpec(1e-5, math.inf, centered=centered)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the last case then runs in parallel blocks of rows
    try:
        _, dx, dw, db = _train(x, weight, bias, spec, dy, True)
    finally:
        torch.set_num_threads(threads)
    _, cache = R.lp_batch_norm_forward(
        x.numpy(), weight.numpy(), bias.numpy(), 1e-5, math.inf, centered=centered
    )
    dx_ref, dw_ref, db_ref = R.lp_batch_norm_backward(dy.numpy(), cache)
    assert rel_err(dx, dx_ref) <= 1e-10
    assert rel_err(dw, dw_ref) <= 1e-10 and rel_err(db, db_ref) <= 1e-10


@pytest.mark.parametrize(
    "shape, channels_last",
    [
        ((60, 2300), False),  # rows, k = 1: 288 channels per block, past a batch of 256
        ((100, 40, 3, 3), True),  # channels-last rows, 9 rows per sample
        ((100, 70, 2, 3), False),  # rows (N, C * S), k = 6 columns per channel
    ],
)
@pytest.mark.parametrize("p", [2.0, 1.0, math.inf])
def test_row_layout_with_many_groups_in_parallel_matches_torch_op_path(
    shape, channels_last, p, two_threads
):
    """Ghost batches of 8 samples (the last one shorter): the per-(group, channel) merge,
    finish, coefficients and running update run over blocks of channels on the pool; one
    channel sits at mean 1e4 so that the re-centring matters."""
    torch.manual_seed(11)
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    x[:, 1] += 1e4
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    channels = shape[1]
    plan = kernels.plan_for(kernels.readable(x), 8)
    assert plan.parallel and plan.threads == 2 and not plan.planar and plan.groups > 4
    spec = ops.NormSpec(1e-5, p, virtual_batch_size=8)
    weight, bias = torch.rand(channels, dtype=x.dtype) + 0.5, torch.randn(channels, dtype=x.dtype)
    dy = torch.randn_like(x)
    buffers = []
    results = []
    for kernels_on in (True, False):
        xs = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
        w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        mean, second = torch.zeros(channels, dtype=x.dtype), torch.ones(channels, dtype=x.dtype)
        update = ops.RunningUpdate(mean, second, 0.1, ops.VARIANCE if p == 2.0 else ops.SCALE)
        with F.use_kernels(kernels_on):
            y, _ = F.normalize_train(xs, w, b, spec, None, update)
        results.append((y, *torch.autograd.grad(y, (xs, w, b), dy)))
        buffers.append((mean, second))
    for a, b in zip(results[0], results[1], strict=True):
        assert rel_err(a, b) <= TOL[torch.float64]
    for a, b in zip(buffers[0], buffers[1], strict=True):
        assert rel_err(a, b) <= TOL[torch.float64]
