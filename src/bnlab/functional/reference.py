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
(N, C), (N, C, L), (N, C, H, W), (N, C, D, H, W) and channels-last layouts alike.
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


def lp_dispersion(x_centered: Array, p: float, axis: int) -> Array:
    """Per-channel spread D_p of centred values, the quantity lp BatchNorm divides by.

    p = 1:   D = (1/m) sum_i |x_i - mu|        mean absolute deviation
    p = 2:   D = sqrt((1/m) sum_i (x_i - mu)^2) root mean square (the biased std)
    p = inf: D = max_i |x_i - mu|              max absolute deviation
    """
    axes = _reduce_axes(x_centered.ndim, axis)
    a = np.abs(x_centered)
    if p == 1:
        return a.mean(axis=axes)
    if p == 2:
        return np.sqrt((a**2).mean(axis=axes))
    return a.max(axis=axes)


def lp_scale(dispersion: Array, p: float, eps: float) -> Array:
    """The divisor s of lp BatchNorm: sqrt(D^2 + eps) for p = 2 (BatchNorm), else D + eps."""
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
) -> tuple[Array, NormCache]:
    """lp Batch Normalization (Santurkar et al. 2018, section 3.3), training mode.

    Centre by the mini-batch mean, then divide by the per-channel lp spread D_p (see
    :func:`lp_dispersion`): x_hat = (x - mu) / s with s = D_p + eps (p = 1, inf) or
    s = sqrt(D_2^2 + eps) (p = 2, identical to BatchNorm); y = gamma * x_hat + beta.
    """
    p = _check_p(p)
    x = _as_float64(x)
    axes = _reduce_axes(x.ndim, axis)
    mu = x.mean(axis=axes)
    x_centered = x - _per_channel(mu, x.ndim, axis)
    s = lp_scale(lp_dispersion(x_centered, p, axis), p, eps)
    x_hat = x_centered / _per_channel(s, x.ndim, axis)
    g = _as_float64(gamma)
    y = _per_channel(g, x.ndim, axis) * x_hat + _per_channel(_as_float64(beta), x.ndim, axis)
    return y, NormCache(x_hat=x_hat, mean=mu, scale=s, gamma=g, axis=axis, p=p)


def _dispersion_gradient(x_hat: Array, scale: Array, p: float, axis: int) -> Array:
    """The derivative of the spread D_p (or of s, for p = 2) with respect to each x_i - mu.

    p = 1:   sign(x_i - mu) / m
    p = 2:   (x_i - mu) / (m * s)   = x_hat_i / m     (s = sqrt(D^2 + eps))
    p = inf: sign(x_k - mu) at the arg-max k of |x - mu| (first one on ties), 0 elsewhere
    """
    ndim = x_hat.ndim
    m = x_hat.size // x_hat.shape[axis]
    if p == 1:
        return np.sign(x_hat) / m
    if p == 2:
        return x_hat / m
    moved = np.moveaxis(x_hat, axis, 0).reshape(x_hat.shape[axis], -1)
    k = np.abs(moved).argmax(axis=1)
    onehot = np.zeros_like(moved)
    onehot[np.arange(moved.shape[0]), k] = np.sign(moved[np.arange(moved.shape[0]), k])
    shape = [x_hat.shape[axis]] + [d for a, d in enumerate(x_hat.shape) if a != axis % ndim]
    return np.moveaxis(onehot.reshape(shape), 0, axis)


def lp_batch_norm_backward(
    dy: NDArray[np.floating], cache: NormCache
) -> tuple[Array, Array, Array]:
    """Gradients of lp Batch Normalization, derived by hand.

    With g = gamma * dy (the gradient at x_hat), x_c = x - mu and s = s(D_p(x_c)):

        a_i   = g_i / s - (sum_j g_j x_hat_j / s) * dD_p/dx_c,i
        dx_i  = a_i - (1/m) sum_j a_j        (the mean subtraction's Jacobian)
        dgamma = sum_i dy_i x_hat_i,  dbeta = sum_i dy_i

    For p = 2 this reduces to :func:`batch_norm_backward`.
    """
    dy = _as_float64(dy)
    axis, ndim = cache.axis, dy.ndim
    axes = _reduce_axes(ndim, axis)
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * cache.x_hat).sum(axis=axes)
    g = dy * _per_channel(cache.gamma, ndim, axis)
    s = _per_channel(cache.scale, ndim, axis)
    g_dot_xhat = _per_channel((g * cache.x_hat).sum(axis=axes), ndim, axis)
    a = g / s - (g_dot_xhat / s) * _dispersion_gradient(cache.x_hat, cache.scale, cache.p, axis)
    dx = a - a.mean(axis=axes, keepdims=True)
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
