"""Claim 9: features of very different variance make the logistic loss ill-conditioned.

Closed-form, float64 NumPy measurements on a regularized logistic regression

    L(w, b) = mean_i [ softplus(z_i) - y_i z_i ] + (lam / 2) sum_j var_j w_j^2,   z = X w + b,

y in {0, 1}, var_j the variance of feature j. The penalty measures each weight in standard
deviations of its feature, so the raw and the standardized fits are one model in two coordinate
systems (same predictions, same optimal loss): only the conditioning differs. Measured on the raw
features and on the standardized features (x - mean) / std:

- the Hessian at the optimum, H = X1^T diag(s (1 - s)) X1 / n + lam diag(var_1, .., var_d, 0)
  with X1 = [X, 1], and its condition number lambda_max / lambda_min;
- plain gradient descent from zero with step 1 / beta, beta = lambda_max(X1^T X1) / (4 n)
  + lam max_j var_j the global smoothness bound, counted until L - L* <= tol;
- the learned weight of each feature;
- for two-feature data (the mouse example) the loss on a grid of (w_1, w_2) with b at its optimum,
  and the gradient-descent path, so the report can draw the contours without recomputing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.float64]

# regularization keeps the optimum finite on (nearly) separable data; small next to the data term
LAMBDA = 1e-3
LOSS_GAP = 1e-4  # gradient descent has converged when L - L* <= this many nats
MAX_STEPS = 20_000
PATH_POINTS = 400
GRID = 60


@dataclass
class ConditioningResult:
    """One dataset under one scaling ("raw" or "standardized"); every field is JSON-ready."""

    dataset: str
    scaling: str
    features: list[str]
    regularization: float
    hessian_eigenvalues: list[float]
    hessian_condition: float
    smoothness: float
    gd_steps: int | None  # None: not converged within max_steps
    max_steps: int
    loss_gap_tolerance: float
    optimal_loss: float
    final_loss: float
    weights: list[float]
    bias: float
    optimal_weights: list[float]
    feature_std: list[float]  # std of each feature as given (1 for standardized features)
    path: list[list[float]] = field(default_factory=list)  # [(w_1, w_2)], two features only
    contour: dict[str, Any] = field(default_factory=dict)  # {"w1": [], "w2": [], "loss": [[]]}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sigmoid(z: Array) -> Array:
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * z)), dtype=np.float64)


def _loss(X1: Array, y: Array, theta: Array, penalty: Array) -> float:
    z = X1 @ theta
    w = theta[:-1]
    return float(np.mean(np.logaddexp(0.0, z) - y * z) + 0.5 * (penalty * w) @ w)


def _gradient(X1: Array, y: Array, theta: Array, penalty: Array) -> Array:
    g = X1.T @ (_sigmoid(X1 @ theta) - y) / len(y)
    g[:-1] += penalty * theta[:-1]
    return np.asarray(g, dtype=np.float64)


def _hessian(X1: Array, theta: Array, penalty: Array) -> Array:
    s = _sigmoid(X1 @ theta)
    H = (X1 * (s * (1.0 - s))[:, None]).T @ X1 / len(X1)
    H[np.arange(len(theta) - 1), np.arange(len(theta) - 1)] += penalty
    return np.asarray(H, dtype=np.float64)


def _newton_optimum(X1: Array, y: Array, penalty: Array, iterations: int = 100) -> Array:
    """The minimizer by damped Newton steps (affine invariant, so raw features do not slow it)."""
    theta = np.zeros(X1.shape[1])
    loss = _loss(X1, y, theta, penalty)
    for _ in range(iterations):
        step = np.linalg.lstsq(
            _hessian(X1, theta, penalty), _gradient(X1, y, theta, penalty), rcond=None
        )
        direction = step[0]
        t = 1.0
        while t > 1e-10:
            candidate = theta - t * direction
            new_loss = _loss(X1, y, candidate, penalty)
            if new_loss <= loss:
                break
            t *= 0.5
        if loss - new_loss < 1e-15:
            theta = candidate if new_loss <= loss else theta
            break
        theta, loss = candidate, new_loss
    return theta


def measure_conditioning(
    X: Array,
    y: Array,
    features: list[str],
    *,
    dataset: str,
    scaling: str,
    lam: float = LAMBDA,
    max_steps: int = MAX_STEPS,
    loss_gap: float = LOSS_GAP,
) -> ConditioningResult:
    """Condition number, gradient-descent steps and weights for features ``X`` (n, d), labels
    ``y`` (n,) in {0, 1}. Raises ValueError on mismatched shapes or labels outside {0, 1}."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if X.ndim != 2 or y.shape != (X.shape[0],) or len(features) != X.shape[1]:
        raise ValueError(
            f"conditioning expects X (n, d), y (n,) and d feature names; got X {X.shape}, "
            f"y {y.shape}, {len(features)} names"
        )
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("conditioning expects binary labels in {0, 1}")
    X1 = np.hstack([X, np.ones((len(X), 1))])
    penalty = lam * X.var(axis=0)
    theta_star = _newton_optimum(X1, y, penalty)
    optimal_loss = _loss(X1, y, theta_star, penalty)
    eigenvalues = np.linalg.eigvalsh(_hessian(X1, theta_star, penalty))
    beta = float(np.linalg.eigvalsh(X1.T @ X1 / len(X1))[-1] / 4.0 + penalty.max())

    theta = np.zeros(X1.shape[1])
    trajectory = [theta.copy()]
    steps: int | None = None
    loss = _loss(X1, y, theta, penalty)
    for step in range(1, max_steps + 1):
        theta = theta - _gradient(X1, y, theta, penalty) / beta
        if X.shape[1] == 2:
            trajectory.append(theta.copy())
        loss = _loss(X1, y, theta, penalty)
        if loss - optimal_loss <= loss_gap:
            steps = step
            break

    result = ConditioningResult(
        dataset=dataset,
        scaling=scaling,
        features=list(features),
        regularization=lam,
        hessian_eigenvalues=[float(e) for e in eigenvalues],
        hessian_condition=float(eigenvalues[-1] / eigenvalues[0]),
        smoothness=beta,
        gd_steps=steps,
        max_steps=max_steps,
        loss_gap_tolerance=loss_gap,
        optimal_loss=optimal_loss,
        final_loss=loss,
        weights=[float(w) for w in theta[:-1]],
        bias=float(theta[-1]),
        optimal_weights=[float(w) for w in theta_star[:-1]],
        feature_std=[float(v) for v in X.std(axis=0)],
    )
    if X.shape[1] == 2:
        path = np.array(trajectory)[:, :2]
        keep = np.unique(np.linspace(0, len(path) - 1, PATH_POINTS).round().astype(int))
        result.path = path[keep].tolist()
        result.contour = _loss_grid(X1, y, theta_star, path, penalty)
    return result


def _loss_grid(
    X1: Array, y: Array, theta_star: Array, path: Array, penalty: Array
) -> dict[str, Any]:
    """The loss over a (w_1, w_2) grid covering the optimum and the GD path, b = b*."""
    points = np.vstack([path, theta_star[None, :2]])
    low, high = points.min(axis=0), points.max(axis=0)
    pad = 0.25 * np.maximum(high - low, 1e-3 * np.maximum(np.abs(high), 1.0))
    w1 = np.linspace(low[0] - pad[0], high[0] + pad[0], GRID)
    w2 = np.linspace(low[1] - pad[1], high[1] + pad[1], GRID)
    W1, W2 = np.meshgrid(w1, w2)  # loss[i, j] is at (w1[j], w2[i])
    z = (
        X1[:, 0, None, None] * W1[None]
        + X1[:, 1, None, None] * W2[None]
        + theta_star[2] * X1[:, 2, None, None]
    )
    data = np.mean(np.logaddexp(0.0, z) - y[:, None, None] * z, axis=0)
    loss = data + 0.5 * (penalty[0] * W1**2 + penalty[1] * W2**2)
    return {
        "w1": w1.tolist(),
        "w2": w2.tolist(),
        "loss": loss.tolist(),
        "bias": float(theta_star[2]),
        "optimum": [float(theta_star[0]), float(theta_star[1])],
    }


def standardize(X: Array) -> Array:
    """(x - mean) / std per feature (population std; a constant feature is left centred)."""
    X = np.asarray(X, dtype=np.float64)
    std = X.std(axis=0)
    return np.asarray((X - X.mean(axis=0)) / np.where(std > 0, std, 1.0), dtype=np.float64)


def raw_and_standardized(
    X: Array, y: Array, features: list[str], dataset: str, **options: Any
) -> list[ConditioningResult]:
    """The claim-9 pair for one dataset: raw features, then standardized."""
    return [
        measure_conditioning(X, y, features, dataset=dataset, scaling="raw", **options),
        measure_conditioning(
            standardize(X), y, features, dataset=dataset, scaling="standardized", **options
        ),
    ]
