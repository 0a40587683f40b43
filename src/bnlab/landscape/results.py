"""What the landscape probes return: plain dataclasses that serialize to JSON.

Every result has ``to_dict()`` (JSON types only: numbers, strings, lists, dicts) and
``to_json()``. Tensors a caller may want back (eigenvectors, directions) are kept on the object
but left out of ``to_dict``, so a stored metric never carries a model-sized blob.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

from torch import Tensor

__all__ = [
    "BatchNormGradientBound",
    "CovariateShift",
    "CurvatureAlongGradient",
    "EffectiveLearningRates",
    "Eigenpairs",
    "GradientBound",
    "GradientPath",
    "LayerScale",
    "LayerShift",
    "LossSurface",
    "Sharpness",
    "SpectralDensity",
    "TraceEstimate",
    "to_json",
]


def _plain(value: Any) -> Any:
    if isinstance(value, Result):
        return value.to_dict()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no inf/nan; keep them readable
    return value


class Result:
    """Base of the results; ``to_dict`` skips fields with ``metadata={"json": False}``."""

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: _plain(getattr(self, f.name))
            for f in fields(self)  # type: ignore[arg-type]
            if f.metadata.get("json", True)
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)


def to_json(result: Result | dict[str, Any], **kwargs: Any) -> str:
    """JSON text of a result or of a ``{group: result}`` dict returned by a per-group probe."""
    return json.dumps(_plain(result), **kwargs)


@dataclass
class GradientPath(Result):
    """Loss and gradient along the gradient direction (Santurkar et al. 2018, section 3.1).

    For each step size ``etas[i]``: ``losses[i]`` = L(w - eta g), ``gradient_differences[i]`` =
    ||g(w) - g(w - eta g)|| ("gradient predictiveness"), ``smoothness[i]`` = that difference over
    ||eta g||; ``effective_beta_smoothness`` is the largest of them.
    """

    etas: list[float]
    loss: float
    gradient_norm: float
    losses: list[float]
    gradient_differences: list[float]
    smoothness: list[float]
    effective_beta_smoothness: float
    mode: str
    num_batches: int
    gradient_evaluations: int


@dataclass
class LayerShift(Result):
    """Definition 2.1 for one layer: G (before) and G' (after the earlier layers' update)."""

    layer: str
    l2_difference: float
    cosine: float
    gradient_norm: float
    shifted_gradient_norm: float


@dataclass
class CovariateShift(Result):
    """Internal covariate shift per layer, in forward order (Santurkar et al. 2018, Def. 2.1)."""

    layers: list[LayerShift]
    mode: str
    num_batches: int

    def l2_differences(self) -> dict[str, float]:
        return {s.layer: s.l2_difference for s in self.layers}

    def cosines(self) -> dict[str, float]:
        return {s.layer: s.cosine for s in self.layers}


@dataclass
class Eigenpairs(Result):
    """Top eigenvalues of the Hessian (of one parameter group) by Lanczos, largest first.

    ``residuals[i]`` bounds ||H u_i - lambda_i u_i|| for the unit Ritz vector u_i (exact with
    full reorthogonalization); ``converged`` says all of them met ``tol * |lambda_i|``.
    ``eigenvectors[i]`` maps parameter names to tensors (unit norm over the group; not in JSON).
    """

    group: str
    eigenvalues: list[float]
    residuals: list[float]
    iterations: int
    hvp_count: int
    converged: bool
    tol: float
    dimension: int
    mode: str
    num_batches: int
    operator: str = "hessian"
    eigenvectors: list[dict[str, Tensor]] = field(
        default_factory=list, repr=False, metadata={"json": False}
    )


@dataclass
class Sharpness(Result):
    """The top eigenvalue of the training loss's Hessian (Cohen et al. 2021): gradient descent
    with step size lr is stable on the local quadratic iff ``sharpness < 2 / lr``.

    ``residual`` bounds ||H u - lambda u|| (and so the eigenvalue's error); ``warm_started``
    says Lanczos started from a previous eigenvector; ``eigenvector`` (not in JSON) is what to
    pass as ``previous`` next time.
    """

    sharpness: float
    residual: float
    iterations: int
    hvp_count: int
    converged: bool
    warm_started: bool
    tol: float
    dimension: int
    mode: str
    num_batches: int
    operator: str = "hessian"
    eigenvector: dict[str, Tensor] = field(
        default_factory=dict, repr=False, metadata={"json": False}
    )

    def stable(self, lr: float) -> bool:
        """Whether gradient descent with step size ``lr`` is stable on the local quadratic."""
        return self.sharpness < 2.0 / lr


@dataclass
class TraceEstimate(Result):
    """Hutchinson estimate of tr(H) with its standard error (std of the samples / sqrt(count)).

    ``group_traces`` / ``group_standard_errors``: tr of each diagonal block H_gg, from the same
    samples (E[v_g^T (H v)_g] = tr H_gg since the probes of different groups are independent).
    """

    trace: float
    standard_error: float
    samples: int
    hvp_count: int
    distribution: str
    dimension: int
    mode: str
    num_batches: int
    group_traces: dict[str, float] = field(default_factory=dict)
    group_standard_errors: dict[str, float] = field(default_factory=dict)
    operator: str = "hessian"


@dataclass
class SpectralDensity(Result):
    """Stochastic Lanczos quadrature: the spectral measure of H as weighted nodes.

    ``nodes[r]`` and ``weights[r]`` are the Ritz values of run r and the squared first components
    of their eigenvectors; each run's weights sum to 1, so sum_r sum_i weights[r][i] f(nodes[r][i])
    / runs estimates (1/n) tr f(H). :meth:`density` smooths the measure with a Gaussian kernel.
    """

    group: str
    nodes: list[list[float]]
    weights: list[list[float]]
    iterations: int
    hvp_count: int
    dimension: int
    mode: str
    num_batches: int
    operator: str = "hessian"

    def moment(self, k: int) -> float:
        """Estimate of tr(H^k) / n."""
        runs = len(self.nodes)
        total = sum(
            w * t**k
            for ts, ws in zip(self.nodes, self.weights, strict=True)
            for t, w in zip(ts, ws, strict=True)
        )
        return total / runs

    def density(self, grid: list[float] | Tensor, sigma: float | None = None) -> list[float]:
        """Gaussian-smoothed density at the points of ``grid`` (integrates to 1 over the line).

        ``sigma`` defaults to 1% of the range of the nodes (at least 1e-12 of their scale)."""
        import torch

        g = torch.as_tensor(grid, dtype=torch.float64)
        nodes = torch.tensor([t for ts in self.nodes for t in ts], dtype=torch.float64)
        weights = torch.tensor([w for ws in self.weights for w in ws], dtype=torch.float64)
        weights = weights / len(self.nodes)
        if sigma is None:
            span = float(nodes.max() - nodes.min())
            scale = float(nodes.abs().max())
            sigma = max(0.01 * span, 1e-12 * max(scale, 1.0))
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        z = (g[:, None] - nodes[None, :]) / sigma
        values = (weights[None, :] * torch.exp(-0.5 * z**2)).sum(1) / (
            sigma * math.sqrt(2 * math.pi)
        )
        return [float(v) for v in values]


@dataclass
class CurvatureAlongGradient(Result):
    """g^T H g / ||g||^2, the curvature in the direction of the step (Theorem 4.2)."""

    group: str
    curvature: float
    gradient_norm: float
    loss: float
    mode: str
    num_batches: int


@dataclass
class BatchNormGradientBound(Result):
    """Theorem 4.1 for one BN layer, summed over its channels.

    ``input_gradient_norm`` = ||dL/dx||, ``output_gradient_norm`` = ||dL/dy||, ``bound`` = the
    square root of sum_j (gamma_j^2 / sigma_j^2)(||dL/dy_j||^2 - <1, dL/dy_j>^2 / m
    - <dL/dy_j, x_hat_j>^2 / m); ``ratio`` = input_gradient_norm / bound (<= 1 by the theorem);
    ``channel_ratio_max`` the largest per-channel ratio over every channel (a channel whose
    bound is <= 0 counts 0 when its ||dL/dx_j|| is 0 and inf otherwise);
    ``lipschitz_ratio`` = ||dL/dx|| / ||dL/dy||.
    """

    layer: str
    input_gradient_norm: float
    output_gradient_norm: float
    bound: float
    ratio: float
    channel_ratio_max: float
    lipschitz_ratio: float
    values_per_channel: int


@dataclass
class GradientBound(Result):
    """Theorem 4.1 for every BatchNorm layer, in forward order."""

    layers: list[BatchNormGradientBound]
    loss: float
    num_batches: int

    def ratios(self) -> dict[str, float]:
        return {b.layer: b.ratio for b in self.layers}


@dataclass
class LossSurface(Result):
    """Loss on a 1-D or 2-D grid around w: w + a d1 (+ b d2).

    ``losses`` is a list over ``alphas`` (1-D) or a list of rows, one per alpha, over ``betas``
    (2-D). ``directions`` (not in JSON) are the direction dicts used.
    """

    alphas: list[float]
    betas: list[float] | None
    losses: list[float] | list[list[float]]
    loss: float
    direction_kind: str
    mode: str
    num_batches: int
    directions: list[dict[str, Tensor]] = field(
        default_factory=list, repr=False, metadata={"json": False}
    )


@dataclass
class LayerScale(Result):
    """One layer's weights w (weight and bias together) seen as scale-invariant parameters.

    ``effective_lr`` = lr / ||w||^2; ``grad_dot_weight`` = <g, w> and ``cosine`` its normalized
    value (0 iff the loss is invariant to the scale of w; ``scale_invariant``: |cos| <= tol);
    ``predicted_angular_update`` = atan(lr ||g|| / ||w||), the angle (radians) an SGD step turns
    w by when g is orthogonal to w; ``angular_update`` the angle between the previous step's w
    and this one (None without ``previous``). ``normalized_by``: the normalization layer that
    takes this layer's output (None for a layer named by the caller that feeds none).
    """

    layer: str
    parameters: list[str]
    normalized_by: str | None
    norm: float
    effective_lr: float
    gradient_norm: float
    grad_dot_weight: float
    cosine: float
    scale_invariant: bool
    predicted_angular_update: float
    angular_update: float | None


@dataclass
class EffectiveLearningRates(Result):
    """Effective learning rates of the layers followed by a normalization (van Laarhoven 2017)."""

    layers: list[LayerScale]
    lr: float
    loss: float
    tol: float
    mode: str
    num_batches: int

    def by_layer(self) -> dict[str, LayerScale]:
        return {s.layer: s for s in self.layers}
