"""Reference Batch Normalization in NumPy float64, written as the equations.

This module is the ground truth the tests compare every fast path against. It is meant to be
read: one function per equation group, hand-derived backward passes (no autodiff), variable
names from the papers (Ioffe & Szegedy 2015; Santurkar et al. 2018, section 3.3).

Notation, for one channel c and the m = N * prod(spatial) values x_i of that channel in the
mini-batch:

    mu      = (1/m) sum_i x_i                           mini-batch mean
    sigma^2 = (1/m) sum_i (x_i - mu)^2                   biased mini-batch variance
    x_hat_i = (x_i - mu) / sqrt(sigma^2 + eps)
    y_i     = gamma * x_hat_i + beta

All functions take the channel axis (``axis``) and reduce over every other axis, so they serve
(N, C), (N, C, L), (N, C, H, W), (N, C, D, H, W) and channels-last layouts alike (noisy
BatchNorm: (N, C, *) only, as its draws are indexed by logical position).

lp BatchNorm (section 3.3) divides x - mu by the lp norm average of x "before shifting the
mean" (``centered=True``: of x - mu). Noisy BatchNorm is Algorithm 1 (appendix A.2.1) on the BN
output, from draws that :func:`noise_draws` regenerates from one step's key exactly as the fast
paths make them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.float64]

LP_NORMS = (1, 2, math.inf)


@dataclass(frozen=True)
class NormCache:
    """What the backward pass needs: the normalized input and the per-channel statistics."""

    x_hat: Array
    """Normalized input, same shape as x."""
    mean: Array
    """Per-channel mini-batch mean, shape (C,)."""
    scale: Array
    """Per-channel divisor s, shape (C,): sqrt(sigma^2 + eps) for BN."""
    gamma: Array
    axis: int
    p: float = 2.0
    centered: bool = True
    """lp only: whether the spread was taken of x - mu (True) or of x itself (the paper's form)."""
    x: Array | None = None
    """lp only: the input (the un-centred spread's gradient needs it)."""


def _reduce_axes(ndim: int, axis: int) -> tuple[int, ...]:
    axis = axis % ndim
    return tuple(a for a in range(ndim) if a != axis)


def _per_channel(v: Array, ndim: int, axis: int) -> Array:
    """Reshape a (C,) vector so it broadcasts against an ndim array along ``axis``."""
    shape = [1] * ndim
    shape[axis % ndim] = v.shape[0]
    return v.reshape(shape)


def _as_float64(x: NDArray[np.floating]) -> Array:
    return np.asarray(x, dtype=np.float64)


def batch_norm_forward(
    x: NDArray[np.floating],
    gamma: NDArray[np.floating],
    beta: NDArray[np.floating],
    eps: float = 1e-5,
    axis: int = 1,
) -> tuple[Array, NormCache]:
    """Training-mode Batch Normalization, y = gamma * x_hat + beta.

    mu = mean(x), sigma^2 = mean((x - mu)^2) (biased), x_hat = (x - mu) / sqrt(sigma^2 + eps),
    all per channel over every axis but ``axis``. Returns ``(y, cache)``.
    """
    x = _as_float64(x)
    axes = _reduce_axes(x.ndim, axis)
    mu = x.mean(axis=axes)
    x_centered = x - _per_channel(mu, x.ndim, axis)
    sigma2 = (x_centered**2).mean(axis=axes)
    s = np.sqrt(sigma2 + eps)
    x_hat = x_centered / _per_channel(s, x.ndim, axis)
    g = _as_float64(gamma)
    y = _per_channel(g, x.ndim, axis) * x_hat + _per_channel(_as_float64(beta), x.ndim, axis)
    return y, NormCache(x_hat=x_hat, mean=mu, scale=s, gamma=g, axis=axis, p=2.0)


def batch_norm_backward(dy: NDArray[np.floating], cache: NormCache) -> tuple[Array, Array, Array]:
    """Gradients of Batch Normalization, derived by hand.

    With m values per channel and s = sqrt(sigma^2 + eps):

        dbeta  = sum_i dy_i
        dgamma = sum_i dy_i * x_hat_i
        dx_i   = (gamma / s) * (dy_i - dbeta / m - x_hat_i * dgamma / m)

    Returns ``(dx, dgamma, dbeta)``.
    """
    dy = _as_float64(dy)
    axis, ndim = cache.axis, dy.ndim
    axes = _reduce_axes(ndim, axis)
    m = dy.size // dy.shape[axis]
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * cache.x_hat).sum(axis=axes)
    dx = _per_channel(cache.gamma / cache.scale, ndim, axis) * (
        dy
        - _per_channel(dbeta / m, ndim, axis)
        - cache.x_hat * _per_channel(dgamma / m, ndim, axis)
    )
    return dx, dgamma, dbeta


def batch_norm_inference(
    x: NDArray[np.floating],
    running_mean: NDArray[np.floating],
    running_var: NDArray[np.floating],
    gamma: NDArray[np.floating],
    beta: NDArray[np.floating],
    eps: float = 1e-5,
    axis: int = 1,
) -> Array:
    """Eval-mode Batch Normalization with the running statistics:

    y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta
    """
    x = _as_float64(x)
    s = np.sqrt(_as_float64(running_var) + eps)
    x_hat = (x - _per_channel(_as_float64(running_mean), x.ndim, axis)) / _per_channel(
        s, x.ndim, axis
    )
    return _per_channel(_as_float64(gamma), x.ndim, axis) * x_hat + _per_channel(
        _as_float64(beta), x.ndim, axis
    )


def running_update(
    running: NDArray[np.floating], batch_value: NDArray[np.floating], momentum: float
) -> Array:
    """Exponential moving average used for the running statistics:
    running <- (1 - momentum) * running + momentum * batch_value."""
    return (1.0 - momentum) * _as_float64(running) + momentum * _as_float64(batch_value)


def unbiased_variance(sigma2: NDArray[np.floating], m: int) -> Array:
    """The running variance is updated with the unbiased estimate sigma^2 * m / (m - 1)."""
    return _as_float64(sigma2) * m / (m - 1)


def _check_p(p: float) -> float:
    p = float(p)
    if p not in LP_NORMS:
        raise ValueError(f"p must be one of 1, 2, inf, got {p}")
    return p


def lp_dispersion(values: Array, p: float, axis: int) -> Array:
    """Per-channel lp spread D_p of ``values`` (x - mu for the centred form, x for the paper's):

    p = 1:   D = (1/m) sum_i |v_i|                mean absolute value
    p = 2:   D = sqrt((1/m) sum_i v_i^2)          root mean square
    p = inf: D = max_i |v_i|                      max absolute value
    """
    axes = _reduce_axes(values.ndim, axis)
    a = np.abs(values)
    if p == 1:
        return a.mean(axis=axes)
    if p == 2:
        return np.sqrt((a**2).mean(axis=axes))
    return a.max(axis=axes)


def lp_scale(dispersion: Array, p: float, eps: float) -> Array:
    """The divisor s of lp BatchNorm: sqrt(D^2 + eps) for p = 2 (as BatchNorm), else D + eps."""
    if p == 2:
        return np.sqrt(dispersion**2 + eps)
    return dispersion + eps


def lp_batch_norm_forward(
    x: NDArray[np.floating],
    gamma: NDArray[np.floating],
    beta: NDArray[np.floating],
    eps: float = 1e-5,
    p: float = 1,
    axis: int = 1,
    centered: bool = False,
) -> tuple[Array, NormCache]:
    """lp Batch Normalization (Santurkar et al. 2018, section 3.3), training mode.

    Fix the first moment as BatchNorm does, then divide "by the average of their lp-norm (before
    shifting the mean)": x_hat = (x - mu) / s with s from the per-channel spread D_p of x itself
    (see :func:`lp_dispersion`), s = D_p + eps (p = 1, inf) or s = sqrt(D_2^2 + eps) (p = 2);
    y = gamma * x_hat + beta. ``centered=True``: D_p of x - mu instead (then p = 2 is
    BatchNorm).
    """
    p = _check_p(p)
    x = _as_float64(x)
    axes = _reduce_axes(x.ndim, axis)
    mu = x.mean(axis=axes)
    x_centered = x - _per_channel(mu, x.ndim, axis)
    s = lp_scale(lp_dispersion(x_centered if centered else x, p, axis), p, eps)
    x_hat = x_centered / _per_channel(s, x.ndim, axis)
    g = _as_float64(gamma)
    y = _per_channel(g, x.ndim, axis) * x_hat + _per_channel(_as_float64(beta), x.ndim, axis)
    return y, NormCache(
        x_hat=x_hat, mean=mu, scale=s, gamma=g, axis=axis, p=p, centered=centered, x=x
    )


def _dispersion_gradient(values: Array, scale: Array, p: float, axis: int) -> Array:
    """The derivative of s with respect to each of the ``values`` whose spread it is (x - mu for
    the centred form, x for the paper's); m values per channel.

    p = 1:   sign(v_i) / m
    p = 2:   v_i / (m * s)                        (s = sqrt(D^2 + eps))
    p = inf: sign(v_k) at the arg-max k of |v| (first one on ties), 0 elsewhere
    """
    ndim = values.ndim
    m = values.size // values.shape[axis]
    if p == 1:
        return np.sign(values) / m
    if p == 2:
        return values / (m * _per_channel(scale, ndim, axis))
    moved = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)
    k = np.abs(moved).argmax(axis=1)
    onehot = np.zeros_like(moved)
    onehot[np.arange(moved.shape[0]), k] = np.sign(moved[np.arange(moved.shape[0]), k])
    shape = [values.shape[axis]] + [d for a, d in enumerate(values.shape) if a != axis % ndim]
    return np.moveaxis(onehot.reshape(shape), 0, axis)


def lp_batch_norm_backward(
    dy: NDArray[np.floating], cache: NormCache
) -> tuple[Array, Array, Array]:
    """Gradients of lp Batch Normalization, derived by hand.

    With g = gamma * dy (the gradient at x_hat), c = sum_j g_j x_hat_j / s (minus the gradient
    at s) and P the mean subtraction's Jacobian (P a = a - mean(a)):

        paper's form:  dx = P(g / s) - c * ds/dx          (s a function of x)
        centred form:  dx = P(g / s - c * ds/d(x - mu))   (s a function of x - mu)
        dgamma = sum_i dy_i x_hat_i,  dbeta = sum_i dy_i

    For the centred p = 2 this reduces to :func:`batch_norm_backward`.
    """
    dy = _as_float64(dy)
    axis, ndim = cache.axis, dy.ndim
    axes = _reduce_axes(ndim, axis)
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * cache.x_hat).sum(axis=axes)
    g = dy * _per_channel(cache.gamma, ndim, axis)
    s = _per_channel(cache.scale, ndim, axis)
    c = _per_channel((g * cache.x_hat).sum(axis=axes), ndim, axis) / s
    if cache.centered:
        x_c = cache.x_hat * s
        a = g / s - c * _dispersion_gradient(x_c, cache.scale, cache.p, axis)
        return a - a.mean(axis=axes, keepdims=True), dgamma, dbeta
    if cache.x is None:
        raise ValueError("the paper's lp backward needs the input x in the cache")
    a = g / s
    dx = a - a.mean(axis=axes, keepdims=True)
    dx -= c * _dispersion_gradient(cache.x, cache.scale, cache.p, axis)
    return dx, dgamma, dbeta


def lp_batch_norm_inference(
    x: NDArray[np.floating],
    running_mean: NDArray[np.floating],
    running_scale: NDArray[np.floating],
    gamma: NDArray[np.floating],
    beta: NDArray[np.floating],
    axis: int = 1,
) -> Array:
    """Eval-mode lp BatchNorm: y = gamma * (x - running_mean) / running_scale + beta.

    ``running_scale`` is the moving average of the training divisor s (eps included), so eval
    divides by it directly.
    """
    x = _as_float64(x)
    s = _as_float64(running_scale)
    x_hat = (x - _per_channel(_as_float64(running_mean), x.ndim, axis)) / _per_channel(
        s, x.ndim, axis
    )
    return _per_channel(_as_float64(gamma), x.ndim, axis) * x_hat + _per_channel(
        _as_float64(beta), x.ndim, axis
    )


def batch_renorm_forward(
    x: NDArray[np.floating],
    gamma: NDArray[np.floating],
    beta: NDArray[np.floating],
    running_mean: NDArray[np.floating],
    running_var: NDArray[np.floating],
    eps: float = 1e-5,
    r_max: float = 3.0,
    d_max: float = 5.0,
    axis: int = 1,
) -> tuple[Array, Array, Array]:
    """Batch Renormalization (Ioffe 2017), training mode.

    sigma_B = sqrt(sigma^2 + eps), sigma = sqrt(running_var + eps),
    r = clip(sigma_B / sigma, 1/r_max, r_max),
    d = clip((mu_B - running_mean) / sigma, -d_max, d_max),
    y = gamma * (x_hat * r + d) + beta, with r and d held constant in the backward pass.
    Returns ``(y, r, d)``.
    """
    x = _as_float64(x)
    y_bn, cache = batch_norm_forward(x, np.ones_like(gamma), np.zeros_like(beta), eps, axis)
    sigma = np.sqrt(_as_float64(running_var) + eps)
    r = np.clip(cache.scale / sigma, 1.0 / r_max, r_max)
    d = np.clip((cache.mean - _as_float64(running_mean)) / sigma, -d_max, d_max)
    x_hat = y_bn * _per_channel(r, x.ndim, axis) + _per_channel(d, x.ndim, axis)
    y = _per_channel(_as_float64(gamma), x.ndim, axis) * x_hat + _per_channel(
        _as_float64(beta), x.ndim, axis
    )
    return y, r, d


# --- noisy BatchNorm (Santurkar et al. 2018, appendix A.2.1, Algorithm 1) ----------------------

NOISE_LEVELS = 1 << 16
"""Each activation's two noise values come from 16 bits each of one 32-bit hash."""


def _lowbias32(counter: NDArray[np.uint64], key: tuple[int, int]) -> NDArray[np.uint64]:
    """lowbias32 (C. Wellons), keyed: lowbias32((counter mod 2^32) ^ key[0]) + key[1] mod 2^32,
    on uint64 lanes (products of 32-bit values fit)."""
    m32 = np.uint64(0xFFFFFFFF)
    x = (counter & m32) ^ np.uint64(key[0])
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & m32
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & m32
    x ^= x >> np.uint64(16)
    return (x + np.uint64(key[1])) & m32


@dataclass(frozen=True)
class NoiseDraws:
    """One training step's random values of Algorithm 1 for an (N, C, *) activation."""

    mu_t: Array
    """(C,): mu_t ~ U(-n_mu, n_mu) per unit."""
    sigma_t: Array
    """(C,): sigma_t ~ U(1, n_sigma) per unit."""
    u: Array
    """Same shape as the activation: uniform on (-1, 1), so m = mu_t + r_mu u."""
    z: Array
    """Same shape: standard normal, so s = sigma_t + r_sigma z."""


def noise_draws(
    shape: tuple[int, ...], key: tuple[int, int], n_mu: float, n_sigma: float
) -> NoiseDraws:
    """The draws of one step from its key (two 32-bit words), as every fast path makes them.

    Per unit c: u_c, v_c = (h + 1/2) / 2^32 of the hashes of counters 2c, 2c + 1 under the
    swapped key; mu_t = n_mu (2 u_c - 1), sigma_t = 1 + (n_sigma - 1) v_c.
    Per activation (n, c, j) (j the flat spatial index): the hash h of counter c N S + n S + j;
    u = (2 (h >> 16) + 1 - 2^16) / 2^16 (uniform on 2^16 levels of (-1, 1)) and z from
    :func:`_normal_from_bits` of h's low 16 bits and the hash h2 of the counter XOR 2^31.
    """
    n, c = shape[0], shape[1]
    size = math.prod(shape[2:])
    swapped = (key[1], key[0])
    channel = _lowbias32(np.arange(2 * c, dtype=np.uint64), swapped).astype(np.float64)
    unit = (channel.reshape(c, 2) + 0.5) * 2.0**-32
    mu_t = n_mu * (2 * unit[:, 0] - 1)
    sigma_t = 1 + (n_sigma - 1) * unit[:, 1]
    counter = (
        np.arange(c, dtype=np.uint64).reshape(1, c, 1) * np.uint64(n * size)
        + np.arange(n, dtype=np.uint64).reshape(n, 1, 1) * np.uint64(size)
        + np.arange(size, dtype=np.uint64).reshape(1, 1, size)
    )
    h = _lowbias32(counter, key)
    u = (2.0 * (h >> np.uint64(16)).astype(np.float64) + 1 - NOISE_LEVELS) / NOISE_LEVELS
    h2 = _lowbias32(counter ^ np.uint64(1 << 31), key)
    z = _normal_from_bits(h & np.uint64(0xFFFF), h2)
    return NoiseDraws(mu_t, sigma_t, u.reshape(shape), z.reshape(shape))


NORMAL_COEFFICIENTS = (
    1.6668350390281728,
    0.04817025527518963,
    0.027934047585635034,
    -0.01692257687815148,
    0.005337823409600361,
)
"""The odd polynomial of :func:`_normal_from_bits` (written out here again: the reference
shares no code with the paths it checks)."""


def _normal_from_bits(low: NDArray[np.integer], high: NDArray[np.integer]) -> Array:
    """Standard normal values from 48 bits: ``low`` (16 bits) above ``high`` (32 bits), read as
    four 12-bit digits a, b, c, d; their sum, centred and scaled, w = (a + b + c + d - 8190)
    / 4096 (four uniforms: mean 0, variance 1/3, within +-2), goes through the odd polynomial
    z = w (c0 + w^2 (c1 + ... + w^2 c4)) fitted to the normal's quantiles, float64."""
    bits = (low.astype(np.uint64) << np.uint64(32)) | high.astype(np.uint64)
    digits = [(bits >> np.uint64(12 * i)) & np.uint64(0xFFF) for i in range(4)]
    w = (sum(d.astype(np.int64) for d in digits) - 8190).astype(np.float64) / 4096
    w2 = w * w
    z = np.zeros_like(w)
    for coefficient in reversed(NORMAL_COEFFICIENTS):
        z = z * w2 + coefficient
    return z * w


def algorithm1_noise(
    a: NDArray[np.floating],
    draws: NoiseDraws,
    r_mu: float,
    r_sigma: float,
) -> tuple[Array, Array]:
    """Algorithm 1, lines 10-14, on the batch-normalized activation a (N, C, *):

        m_ij ~ U(mu_t - r_mu, mu_t + r_mu):   m = mu_t + r_mu u
        s_ij ~ N(sigma_t, r_sigma):           s = sigma_t + r_sigma z   (r_sigma a std)
        a_ij <- s_ij a_ij + m_ij

    Returns ``(noisy a, s)``; s is what the backward multiplies by (da = s * d(noisy a)).
    """
    a = _as_float64(a)
    mu_t = _per_channel(draws.mu_t, a.ndim, 1)
    sigma_t = _per_channel(draws.sigma_t, a.ndim, 1)
    m = mu_t + r_mu * draws.u
    s = sigma_t + r_sigma * draws.z
    return s * a + m, s


def noisy_batch_norm_forward(
    x: NDArray[np.floating],
    gamma: NDArray[np.floating],
    beta: NDArray[np.floating],
    draws: NoiseDraws,
    r_mu: float,
    r_sigma: float,
    eps: float = 1e-5,
) -> tuple[Array, NormCache, Array]:
    """Noisy BatchNorm (Santurkar et al. 2018, Algorithm 1) in training mode: BatchNorm of x
    (N, C, *), then :func:`algorithm1_noise` on its output. Returns ``(y, cache, s)``."""
    a, cache = batch_norm_forward(x, gamma, beta, eps, axis=1)
    y, s = algorithm1_noise(a, draws, r_mu, r_sigma)
    return y, cache, s


def noisy_batch_norm_backward(
    dy: NDArray[np.floating], cache: NormCache, s: Array
) -> tuple[Array, Array, Array]:
    """Gradients of noisy BatchNorm: BatchNorm's backward of s * dy (m does not depend on x)."""
    return batch_norm_backward(_as_float64(dy) * s, cache)
