"""The NumPy reference against independent truths: torch.nn, finite differences, the paper's
identities. Everything else in the suite is checked against this module."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bnlab.functional import noise
from bnlab.functional import reference as R

shapes = st.sampled_from([(4, 3), (5, 2, 7), (3, 4, 3, 5), (2, 3, 2, 3, 2), (16, 1)])


def _finite_difference(f, x: np.ndarray, dy: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """d <dy, f(x)> / dx by central differences."""
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        up = np.sum(dy * f(x))
        flat[i] = old - h
        down = np.sum(dy * f(x))
        flat[i] = old
        gflat[i] = (up - down) / (2 * h)
    return grad


@given(shape=shapes, seed=st.integers(0, 2**16))
def test_forward_matches_torch_functional_batch_norm(shape, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(2.0, 3.0, size=shape)
    c = shape[1]
    gamma, beta = rng.normal(size=c), rng.normal(size=c)
    y, cache = R.batch_norm_forward(x, gamma, beta, eps=1e-5)
    expected = torch.nn.functional.batch_norm(
        torch.from_numpy(x),
        None,
        None,
        torch.from_numpy(gamma),
        torch.from_numpy(beta),
        training=True,
        eps=1e-5,
    )
    np.testing.assert_allclose(y, expected.numpy(), rtol=1e-12, atol=1e-12)
    assert cache.mean.shape == (c,) and cache.scale.shape == (c,)


@given(shape=shapes, seed=st.integers(0, 2**16))
def test_backward_matches_torch_autograd(shape, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(-1.0, 2.0, size=shape)
    c = shape[1]
    gamma, beta, dy = rng.normal(size=c), rng.normal(size=c), rng.normal(size=shape)
    _, cache = R.batch_norm_forward(x, gamma, beta)
    dx, dgamma, dbeta = R.batch_norm_backward(dy, cache)
    xt = torch.from_numpy(x).requires_grad_()
    gt, bt = torch.from_numpy(gamma).requires_grad_(), torch.from_numpy(beta).requires_grad_()
    torch.nn.functional.batch_norm(xt, None, None, gt, bt, training=True).backward(
        torch.from_numpy(dy)
    )
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dgamma, gt.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dbeta, bt.grad.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("axis", [1, -1, 0])
def test_channel_axis_is_respected(axis):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 3, 5))
    c = x.shape[axis]
    gamma, beta = rng.normal(size=c), rng.normal(size=c)
    y, cache = R.batch_norm_forward(x, gamma, beta, axis=axis)
    moved, _ = R.batch_norm_forward(np.moveaxis(x, axis, 1), gamma, beta, axis=1)
    np.testing.assert_allclose(np.moveaxis(y, axis, 1), moved, rtol=1e-13)
    dy = rng.normal(size=x.shape)
    dx, _, _ = R.batch_norm_backward(dy, cache)
    fd = _finite_difference(lambda t: R.batch_norm_forward(t, gamma, beta, axis=axis)[0], x, dy)
    np.testing.assert_allclose(dx, fd, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("p", [1, 2, math.inf])
@pytest.mark.parametrize("shape", [(6, 3), (4, 2, 3, 2)])
def test_lp_backward_matches_finite_differences(p, shape, centered):
    rng = np.random.default_rng(1)
    x = rng.normal(0.5, 2.0, size=shape)
    c = shape[1]
    gamma, beta, dy = rng.normal(size=c), rng.normal(size=c), rng.normal(size=shape)
    _, cache = R.lp_batch_norm_forward(x, gamma, beta, eps=1e-3, p=p, centered=centered)
    dx, dgamma, dbeta = R.lp_batch_norm_backward(dy, cache)
    fd = _finite_difference(
        lambda t: R.lp_batch_norm_forward(t, gamma, beta, 1e-3, p, centered=centered)[0], x, dy
    )
    np.testing.assert_allclose(dx, fd, rtol=1e-5, atol=1e-7)
    axes = tuple(a for a in range(x.ndim) if a != 1)
    np.testing.assert_allclose(dbeta, dy.sum(axis=axes), rtol=1e-12)
    np.testing.assert_allclose(dgamma, (dy * cache.x_hat).sum(axis=axes), rtol=1e-12)


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("p", [1, 2, math.inf])
def test_lp_spread_definitions(p, centered):
    """Santurkar et al. 3.3: the paper's form divides x - mean by the lp norm average of x
    "before shifting the mean"; the centred form by that of x - mean."""
    rng = np.random.default_rng(2)
    x = rng.normal(3.0, 2.0, size=(50, 2))
    y, cache = R.lp_batch_norm_forward(x, np.ones(2), np.zeros(2), eps=0.0, p=p, centered=centered)
    v = x - x.mean(axis=0) if centered else x
    expected = {
        1: np.abs(v).mean(axis=0),
        2: np.sqrt((v**2).mean(axis=0)),
        math.inf: np.abs(v).max(axis=0),
    }[p]
    np.testing.assert_allclose(cache.scale, expected, rtol=1e-13)
    np.testing.assert_allclose(y, (x - x.mean(axis=0)) / expected, rtol=1e-13)
    if p == math.inf and centered:
        assert np.allclose(np.abs(cache.x_hat).max(axis=0), 1.0)
    if not centered:  # mean 3, std 2: the norms of x are well above those of x - mean
        centred = R.lp_dispersion(x - x.mean(axis=0), p, axis=1)
        assert np.all(expected > 1.3 * centred)


def test_paper_lp_eps_is_added_to_the_norm_and_inside_the_root_for_p_2():
    x = np.array([[1.0, -2.0], [3.0, 4.0], [-1.0, 0.5]])
    eps = 0.25
    scales = {
        p: R.lp_batch_norm_forward(x, np.ones(2), np.zeros(2), eps=eps, p=p)[1].scale
        for p in (1, 2, math.inf)
    }
    np.testing.assert_allclose(scales[1], [5 / 3 + eps, 6.5 / 3 + eps], rtol=1e-14)
    np.testing.assert_allclose(scales[2], np.sqrt([11 / 3 + eps, 20.25 / 3 + eps]), rtol=1e-14)
    np.testing.assert_allclose(scales[math.inf], [3 + eps, 4 + eps], rtol=1e-14)


def test_centered_l2_variant_is_batch_norm():
    rng = np.random.default_rng(3)
    x, dy = rng.normal(size=(7, 4, 3)), rng.normal(size=(7, 4, 3))
    gamma, beta = rng.normal(size=4), rng.normal(size=4)
    y_bn, c_bn = R.batch_norm_forward(x, gamma, beta)
    y_l2, c_l2 = R.lp_batch_norm_forward(x, gamma, beta, p=2, centered=True)
    np.testing.assert_allclose(y_l2, y_bn, rtol=1e-13)
    for a, b in zip(
        R.lp_batch_norm_backward(dy, c_l2), R.batch_norm_backward(dy, c_bn), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


@given(shape=shapes, seed=st.integers(0, 2**16))
def test_theorem_4_1_gradient_norm_identity(shape, seed):
    """Santurkar et al., Theorem 4.1 (with eps = 0, where it holds with equality), per channel:
    ||dL/dx||^2 = gamma^2 / sigma^2 (||dL/dy||^2 - <1, dL/dy>^2 / m - <dL/dy, x_hat>^2 / m)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(1.0, 2.0, size=shape)
    c = shape[1]
    gamma, dy = rng.normal(size=c), rng.normal(size=shape)
    _, cache = R.batch_norm_forward(x, gamma, np.zeros(c), eps=0.0)
    dx, _, _ = R.batch_norm_backward(dy, cache)
    axes = tuple(a for a in range(x.ndim) if a != 1)
    m = x.size // c
    lhs = (dx**2).sum(axis=axes)
    rhs = (gamma**2 / cache.scale**2) * (
        (dy**2).sum(axis=axes)
        - dy.sum(axis=axes) ** 2 / m
        - (dy * cache.x_hat).sum(axis=axes) ** 2 / m
    )
    np.testing.assert_allclose(lhs, rhs, rtol=1e-9, atol=1e-12)
    # The bound the theorem states: ||dL/dx||^2 <= gamma^2/sigma^2 * ||dL/dy||^2.
    assert np.all(lhs <= (gamma**2 / cache.scale**2) * (dy**2).sum(axis=axes) * (1 + 1e-12))


def test_inference_and_running_update():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(5, 3, 2))
    rm, rv, g, b = (
        rng.normal(size=3),
        rng.uniform(0.5, 2, size=3),
        rng.normal(size=3),
        rng.normal(size=3),
    )
    y = R.batch_norm_inference(x, rm, rv, g, b, eps=1e-5)
    expected = torch.nn.functional.batch_norm(
        *(torch.from_numpy(a) for a in (x, rm, rv, g, b)), training=False, eps=1e-5
    )
    np.testing.assert_allclose(y, expected.numpy(), rtol=1e-12)
    np.testing.assert_allclose(R.running_update(rm, np.ones(3), 0.25), 0.75 * rm + 0.25)
    np.testing.assert_allclose(R.unbiased_variance(np.array([2.0]), 5), [2.5])


def test_batch_renorm_reduces_to_batch_norm_without_correction():
    rng = np.random.default_rng(5)
    x = rng.normal(3, 2, size=(8, 3))
    g, b = rng.normal(size=3), rng.normal(size=3)
    y, r, d = R.batch_renorm_forward(x, g, b, np.zeros(3), np.ones(3), r_max=1.0, d_max=0.0)
    np.testing.assert_allclose(y, R.batch_norm_forward(x, g, b)[0], rtol=1e-13)
    assert np.all(r == 1.0) and np.all(d == 0.0)
    y, r, d = R.batch_renorm_forward(x, g, b, x.mean(0), x.var(0) * 8 / 7, r_max=3.0, d_max=5.0)
    assert np.all((r >= 1 / 3) & (r <= 3)) and np.allclose(d, 0.0)


def test_unknown_p_is_rejected():
    with pytest.raises(ValueError, match="p must be one of 1, 2, inf"):
        R.lp_batch_norm_forward(np.ones((2, 2)), np.ones(2), np.zeros(2), p=3)


def test_noise_draws_follow_their_definition():
    """reference.noise_draws against the definition written out for one element and unit."""
    shape, key = (3, 2, 5), (0x12345678, 0x7EDCBA98)
    draws = R.noise_draws(shape, key, n_mu=0.5, n_sigma=1.25)

    def lowbias32(x: int, k: tuple[int, int]) -> int:
        x ^= k[0]
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return ((x ^ (x >> 16)) + k[1]) & 0xFFFFFFFF

    n, c, j = 2, 1, 3
    h = lowbias32(c * 3 * 5 + n * 5 + j, key)
    assert draws.u[n, c, j] == (2 * (h >> 16) + 1 - 2**16) / 2**16
    # z: the 48 bits (h's low 16 above the hash of the counter with bit 31 flipped) as four
    # 12-bit digits, their centred sum through the odd polynomial (noise's coefficients, which
    # the reference writes out again)
    bits = ((h & 0xFFFF) << 32) | lowbias32((c * 3 * 5 + n * 5 + j) ^ 2**31, key)
    w = (sum((bits >> (12 * i)) & 0xFFF for i in range(4)) - 8190) / 4096
    c0, c1, c2, c3, c4 = noise.NORMAL_COEFFICIENTS
    assert R.NORMAL_COEFFICIENTS == noise.NORMAL_COEFFICIENTS
    z = w * (c0 + c1 * w**2 + c2 * w**4 + c3 * w**6 + c4 * w**8)
    assert draws.z[n, c, j] == pytest.approx(z, rel=1e-14)
    u_c = (lowbias32(2 * c, (key[1], key[0])) + 0.5) / 2**32
    assert draws.mu_t[c] == pytest.approx(0.5 * (2 * u_c - 1), rel=1e-15)
    v_c = (lowbias32(2 * c + 1, (key[1], key[0])) + 0.5) / 2**32
    assert draws.sigma_t[c] == pytest.approx(1 + 0.25 * v_c, rel=1e-15)


def test_algorithm_1_noise_and_its_backward():
    """a <- s a + m with m = mu_t + r_mu u, s = sigma_t + r_sigma z; the backward is BN's
    backward of s * dy (finite differences)."""
    rng = np.random.default_rng(6)
    shape = (4, 3, 2)
    x, dy = rng.normal(1.0, 2.0, size=shape), rng.normal(size=shape)
    gamma, beta = rng.normal(size=3), rng.normal(size=3)
    draws = R.noise_draws(shape, (5, 9), n_mu=0.5, n_sigma=1.25)
    y, cache, s = R.noisy_batch_norm_forward(x, gamma, beta, draws, 0.1, 0.2)
    a, _ = R.batch_norm_forward(x, gamma, beta)
    m = draws.mu_t.reshape(1, 3, 1) + 0.1 * draws.u
    np.testing.assert_allclose(s, draws.sigma_t.reshape(1, 3, 1) + 0.2 * draws.z, rtol=1e-15)
    np.testing.assert_allclose(y, s * a + m, rtol=1e-15)
    dx, dgamma, dbeta = R.noisy_batch_norm_backward(dy, cache, s)

    def forward(t: np.ndarray) -> np.ndarray:
        return R.noisy_batch_norm_forward(t, gamma, beta, draws, 0.1, 0.2)[0]

    np.testing.assert_allclose(dx, _finite_difference(forward, x, dy), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dbeta, (dy * s).sum(axis=(0, 2)), rtol=1e-13)
    np.testing.assert_allclose(dgamma, (dy * s * cache.x_hat).sum(axis=(0, 2)), rtol=1e-13)
