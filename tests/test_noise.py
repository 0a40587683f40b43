"""Noisy BatchNorm's noise is Algorithm 1 (Santurkar et al. 2018, appendix A.2.1) on every path.

Each step and unit draws mu_t ~ U(-n_mu, n_mu) and sigma_t ~ U(1, n_sigma); each activation
draws m ~ U(mu_t - r_mu, mu_t + r_mu) and s ~ N(sigma_t, r_sigma) and a becomes s a + m. The
tests read m and s back from the layer's output (weight 0 makes a = bias, so bias 0 gives m and
bias 1 gives s + m), on the fused kernels (both glues, planar and row layouts) and on the
torch-op path, and compare their moments with Algorithm 1's.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
import pytest
import torch

import bnlab.functional as F
import bnlab.nn as bnn
from bnlab.functional import kernels, noise, ops
from bnlab.functional import reference as R
from bnlab.functional.kernels import native
from helpers import rel_err

PATHS = ["torch_op", "native", "function"]
"""The torch-op formulas, and the kernels behind the C++ glue or the Python Function."""
LAYOUTS = {
    "planar": ((16, 3, 16, 16), False),  # (N, C, S) loops, S >= 64
    "rows": ((64, 3, 4, 4), False),  # (N, C * S) rows
    "channels_last": ((16, 3, 8, 8), True),  # (N * S, C) rows
}
ODD = F.NoiseSpec(n_mu=0.7, n_sigma=2.0, r_mu=0.3, r_sigma=0.2)
"""Constants unlike the defaults and unlike each other, so a swapped pair shows."""


def _path(name: str):
    if name == "torch_op":
        return F.use_kernels(False)
    if not kernels.numba_available():
        pytest.skip("numba not installed")
    return native.disabled() if name == "function" else nullcontext()


def _m_and_s(shape, channels_last, draw: F.NoiseDraw, path: str) -> tuple[np.ndarray, ...]:
    """(m, s), each of the input's shape (float64), from one step's draw on ``path``."""
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    weight = torch.zeros(c, dtype=x.dtype, requires_grad=True)  # a graph, as in training
    outputs = []
    for bias in (torch.zeros(c, dtype=x.dtype), torch.ones(c, dtype=x.dtype)):
        with _path(path):
            y, _ = F.normalize_train(x, weight, bias, ops.NormSpec(1e-5, noise=draw))
        outputs.append(y.detach().numpy())
    m, s_plus_m = outputs
    return m, s_plus_m - m


def _draw(spec: F.NoiseSpec, seed: int) -> F.NoiseDraw:
    return noise.draw(spec, torch.device("cpu"), torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("spec", [F.NoiseSpec(), ODD], ids=["paper", "odd"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("path", PATHS)
def test_m_and_s_have_algorithm_1_distributions_within_a_step(path, layout, spec):
    """Per unit: m uniform on [mu_t - r_mu, mu_t + r_mu] (mean mu_t, variance r_mu^2 / 3), s
    normal with mean sigma_t and standard deviation r_sigma; mu_t, sigma_t in their ranges."""
    shape, channels_last = LAYOUTS[layout]
    draw = _draw(spec, 7)
    m, s = _m_and_s(shape, channels_last, draw, path)
    mu_t, sigma_t = (t.numpy() for t in draw.channel_params(shape[1]))
    assert np.all(np.abs(mu_t) < spec.n_mu) and np.all((sigma_t > 1) & (sigma_t < spec.n_sigma))
    count = m.size // shape[1]  # 1024 or 4096 values per unit
    standard = []
    for c in range(shape[1]):
        m_c, s_c = m[:, c].ravel(), s[:, c].ravel()
        # Uniform on [mu_t - r_mu, mu_t + r_mu]: every value inside, the ends reached.
        assert np.all(np.abs(m_c - mu_t[c]) <= spec.r_mu * (1 + 1e-12))
        assert np.abs(m_c - mu_t[c]).max() > 0.99 * spec.r_mu
        assert abs(m_c.mean() - mu_t[c]) < 5 * spec.r_mu / math.sqrt(3 * count)
        assert m_c.var() == pytest.approx(spec.r_mu**2 / 3, rel=0.06)
        # Normal N(sigma_t, r_sigma): mean, standard deviation, no bound at a uniform's edge.
        assert abs(s_c.mean() - sigma_t[c]) < 5 * spec.r_sigma / math.sqrt(count)
        assert s_c.std() == pytest.approx(spec.r_sigma, rel=0.05)
        assert np.abs(s_c - sigma_t[c]).max() > 3 * spec.r_sigma
        standard.append((s_c - sigma_t[c]) / spec.r_sigma)
    # The kurtosis of all units' standardized s, within 5 standard errors (sqrt(24 / n)) as the
    # means above: a uniform's is 1.8. (Per unit, a bound of 0.25 at 1024 values was 1.7
    # standard errors: about one unit in 12 fails it by chance.)
    pooled = np.concatenate(standard)
    kurtosis = np.mean(pooled**4) / np.mean(pooled**2) ** 2
    assert kurtosis == pytest.approx(3.0, abs=5 * math.sqrt(24 / pooled.size))


@pytest.mark.parametrize("path", PATHS)
def test_unit_parameters_are_constant_within_a_step_and_redrawn_across_steps(path):
    """A unit's m values all lie in one window [mu_t - r_mu, mu_t + r_mu] per step; the
    windows (and the mean of s) move from step to step, as mu_t ~ U(-n_mu, n_mu) and
    sigma_t ~ U(1, n_sigma)."""
    spec = ODD
    shape, channels_last = LAYOUTS["rows"]
    centres, scales = [], []
    for step in range(24):
        draw = _draw(spec, 100 + step)
        m, s = _m_and_s(shape, channels_last, draw, path)
        mu_t, sigma_t = (t.numpy() for t in draw.channel_params(shape[1]))
        view = (1, -1) + (1,) * (len(shape) - 2)
        assert np.all(np.abs(m - mu_t.reshape(view)) <= spec.r_mu * (1 + 1e-12))
        assert np.abs(s.mean(axis=(0, 2, 3)) - sigma_t).max() < 5 * spec.r_sigma / 32
        centres.append(m.mean(axis=(0, 2, 3)))
        scales.append(s.mean(axis=(0, 2, 3)))
    centre, scale = np.stack(centres), np.stack(scales)
    assert np.all(centre.std(axis=0) > 0.2) and np.all(scale.std(axis=0) > 0.1)
    assert np.all(np.abs(centre) < spec.n_mu + 0.01)
    assert np.all((scale > 1 - 0.01) & (scale < spec.n_sigma + 0.01))


@pytest.mark.parametrize("spec", [F.NoiseSpec(), ODD], ids=["paper", "odd"])
def test_unit_parameters_across_steps_are_uniform_on_their_ranges(spec):
    """mu_t ~ U(-n_mu, n_mu), sigma_t ~ U(1, n_sigma): the moments of 20000 draws (one step
    of 20000 units: every unit's parameters are independent draws)."""
    mu_t, sigma_t = (t.numpy() for t in _draw(spec, 3).channel_params(20000))
    assert mu_t.min() > -spec.n_mu and mu_t.max() < spec.n_mu
    assert sigma_t.min() > 1 and sigma_t.max() < spec.n_sigma
    assert abs(mu_t.mean()) < 5 * spec.n_mu / math.sqrt(3 * 20000)
    assert mu_t.var() == pytest.approx(spec.n_mu**2 / 3, rel=0.03)
    width = spec.n_sigma - 1
    assert abs(sigma_t.mean() - (1 + spec.n_sigma) / 2) < 5 * width / math.sqrt(12 * 20000)
    assert sigma_t.var() == pytest.approx(width**2 / 12, rel=0.03)


def _sum_distribution() -> tuple[np.ndarray, np.ndarray]:
    """(sums, probabilities): the exact distribution of the sum of four uniform 12-bit
    integers, 0 .. 16380."""
    pmf = np.ones(4096)
    for _ in range(3):
        pmf = np.convolve(pmf, np.ones(4096))
    return np.arange(pmf.size), pmf / pmf.sum()


def _bits_with_sum(sums: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(low 16 bits, high 32 bits) whose four 12-bit digits add up to each of ``sums``: the
    digits filled from the lowest, each up to 4095."""
    digits, rest = [], sums.copy()
    for _ in range(4):
        digit = np.minimum(rest, 4095)
        digits.append(digit)
        rest = rest - digit
    assert np.all(rest == 0)
    bits = sum(d.astype(np.int64) << (12 * i) for i, d in enumerate(digits))
    return torch.from_numpy(bits >> 32), torch.from_numpy(bits & 0xFFFFFFFF)


def test_z_has_the_normal_distribution_to_within_its_stated_bounds():
    """z's exact distribution (every value of the digit sum with its probability, through
    noise.normals): symmetric with mean 0, variance and kurtosis the normal's, its CDF within
    2.5e-4 of Phi, normal tails at 2, 3 and 4 standard deviations, values reaching past 5; a
    million draws agree. A plain sum of uniforms (no polynomial) has kurtosis 2.7 and no values
    past 3.5, so each bound tests the polynomial."""
    sums, pmf = _sum_distribution()
    z = noise.normals(*_bits_with_sum(sums), torch.float64).numpy()
    assert np.all(np.diff(z) > 0) and np.array_equal(z, -z[::-1])  # increasing, odd
    assert np.sum(pmf * z) == pytest.approx(0.0, abs=1e-15)
    variance = np.sum(pmf * z**2)
    assert variance == pytest.approx(1.0, abs=1e-5)
    assert np.sum(pmf * z**4) / variance**2 == pytest.approx(3.0, abs=1e-3)
    normal_cdf = np.array([0.5 * math.erfc(-v / math.sqrt(2)) for v in z])
    above, below = np.cumsum(pmf), np.cumsum(pmf) - pmf
    assert max(np.abs(above - normal_cdf).max(), np.abs(below - normal_cdf).max()) < 2.5e-4
    for t, rel in ((2.0, 0.01), (3.0, 0.02), (4.0, 0.1)):
        tail = 0.5 * math.erfc(t / math.sqrt(2))
        assert pmf[z > t].sum() == pytest.approx(tail, rel=rel)
    assert z.max() > 5.1
    np.testing.assert_allclose(z, R._normal_from_bits(*(b.numpy() for b in _bits_with_sum(sums))))
    _, draws = noise.unit_noise(
        torch.Size((256, 4, 32, 32)), _draw(F.NoiseSpec(), 0), torch.float64
    )
    flat = np.sort(draws.numpy().ravel())
    assert abs(flat.mean()) < 0.005 and flat.std() == pytest.approx(1.0, abs=0.003)
    assert np.mean(flat**4) == pytest.approx(3.0, abs=0.03)
    assert np.mean(np.abs(flat) > 3) == pytest.approx(0.0027, rel=0.15)
    cdf = np.array([0.5 * math.erfc(-v / math.sqrt(2)) for v in flat[:: flat.size // 2000]])
    empirical = (np.arange(flat.size)[:: flat.size // 2000] + 0.5) / flat.size
    assert np.abs(cdf - empirical).max() < 0.003


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_z_in_low_precision_is_the_float64_value_rounded_once_or_nearly(dtype):
    """float32 computes the polynomial in float32 (as the kernels do), float16 and bfloat16
    compute in float32 and round once: each within a few of its own ulps of the float64 values,
    the half types exactly the float32 values rounded (computed in float16 they differ)."""
    sums, _ = _sum_distribution()
    low, high = _bits_with_sum(sums)
    exact = noise.normals(low, high, torch.float64)
    found = noise.normals(low, high, dtype)
    assert found.dtype == dtype
    ulp = torch.finfo(dtype).eps * exact.abs().clamp(min=1)
    assert ((found.double() - exact).abs() <= 4 * ulp).all()
    if dtype != torch.float32:
        assert torch.equal(found, noise.normals(low, high, torch.float32).to(dtype))


def test_uniform_levels_fill_minus_one_to_one_evenly():
    u, _ = noise.unit_noise(torch.Size((64, 8, 32, 32)), _draw(F.NoiseSpec(), 0), torch.float64)
    flat = u.ravel()
    assert flat.abs().max() < 1 and abs(flat.mean()) < 0.005
    assert flat.var().item() == pytest.approx(1 / 3, rel=0.01)
    counts = torch.histc(flat, bins=32, min=-1, max=1) / flat.numel()
    assert (counts - 1 / 32).abs().max().item() < 0.004
    assert abs(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1]) < 0.01
    levels = noise.levels(torch.arange(noise.LEVELS), torch.float64)
    assert torch.equal(levels, -levels.flip(0)) and levels[-1] == 1 - 2.0**-16


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_noisy_batch_norm_matches_the_algorithm_1_reference(path, layout):
    """Forward and backward against the float64 reference of Algorithm 1 fed the same draws
    (``reference.noise_draws`` regenerates them from the key with NumPy)."""
    shape, channels_last = LAYOUTS[layout]
    rng = np.random.default_rng(2)
    x64 = rng.normal(1.0, 2.0, size=shape)
    gamma, beta = rng.uniform(0.5, 2, size=shape[1]), rng.normal(size=shape[1])
    dy64 = rng.normal(size=shape)
    draw = _draw(ODD, 5)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        x = torch.from_numpy(x64).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        w = torch.from_numpy(gamma).to(dtype).requires_grad_()
        b = torch.from_numpy(beta).to(dtype).requires_grad_()
        with _path(path):
            y, _ = F.normalize_train(x, w, b, ops.NormSpec(1e-5, noise=draw))
        grads = torch.autograd.grad(y, (x, w, b), torch.from_numpy(dy64).to(dtype))
        draws = R.noise_draws(shape, draw.key, ODD.n_mu, ODD.n_sigma)
        y_ref, cache, s = R.noisy_batch_norm_forward(
            x.detach().double().numpy(), gamma, beta, draws, ODD.r_mu, ODD.r_sigma
        )
        assert rel_err(y, y_ref) <= tol
        for ours, ref in zip(grads, R.noisy_batch_norm_backward(dy64, cache, s), strict=True):
            assert rel_err(ours, ref) <= tol


def test_noisy_module_constants_default_to_the_paper_and_are_configurable():
    layer = bnn.NoisyBatchNorm2d(3, seed=0)
    assert layer.noise == F.NoiseSpec(n_mu=0.5, n_sigma=1.25, r_mu=0.1, r_sigma=0.1)
    odd = bnn.NoisyBatchNorm2d(3, seed=0, n_mu=0.7, n_sigma=2.0, r_mu=0.3, r_sigma=0.2)
    assert odd.noise == ODD and "r_sigma=0.2" in repr(odd)
    assert bnn.norm_layer("noisy_bn", 3, r_sigma=0.2).noise.r_sigma == 0.2


@pytest.mark.parametrize(
    "bad", [{"n_mu": -0.1}, {"n_sigma": 0.9}, {"r_mu": -1.0}, {"r_sigma": -0.1}]
)
def test_noise_spec_rejects_constants_out_of_range(bad):
    with pytest.raises(ValueError, match="n_sigma >= 1"):
        F.NoiseSpec(**bad)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_the_kernels_keep_the_multipliers_for_a_backward_only(layout):
    """With a gradient wanted the fused forward keeps s = sigma_t + r_sigma z (x's shape and
    strides), the values :func:`noise.multipliers` computes with tensor ops; the backward reads
    them (the reference test above checks its gradients). Without a gradient it keeps none."""
    if not kernels.numba_available():
        pytest.skip("numba not installed")
    shape, channels_last = LAYOUTS[layout]
    draw = _draw(ODD, 3)
    spec = ops.NormSpec(1e-5, noise=draw)
    expected = noise.multipliers(torch.Size(shape), draw, torch.float64)
    for wanted in (True, False):
        x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x, plan = kernels.planned(x.requires_grad_(wanted), None)
        out: list = []
        track = kernels._track_args(None, x.dtype)
        kernels.FusedTrainNorm.apply(x, None, None, spec, plan, track, out)
        kept = out[1]
        if not wanted:
            assert kept is None
            continue
        assert kept.shape == x.shape and kept.stride() == x.stride()
        torch.testing.assert_close(kept, expected, rtol=1e-14, atol=0)


def test_norm_train_gives_the_same_multipliers_on_the_loops_and_the_formulas():
    """``bnlab::norm_train``'s third output (what the loops' backward reads under compile) is
    the same s on the CPU loops and on the torch-op formulas; empty without noise."""
    from bnlab.functional import operators

    x = torch.randn(6, 3, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    draw = _draw(ODD, 9)
    key = torch.tensor(draw.key, dtype=torch.int64)
    found = []
    for on_kernels in (True, False):
        with F.use_kernels(on_kernels):
            found.append(
                operators.norm_train(x, None, None, 1e-5, 2.0, True, 0, key, list(ODD.constants))[2]
            )
            plain = operators.norm_train(x, None, None, 1e-5, 2.0, True, 0, None, [])[2]
            assert plain.numel() == 0
    assert found[0].stride() == found[1].stride() == x.stride()
    torch.testing.assert_close(found[0], found[1], rtol=1e-14, atol=0)
    torch.testing.assert_close(
        found[0], noise.multipliers(x.shape, draw, x.dtype), rtol=1e-14, atol=0
    )
