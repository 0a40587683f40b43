"""Landscape probes: read-only measurements of a model's loss landscape (Santurkar et al. 2018).

Every probe has the form ``probe(model, loss_fn, batch_or_loader, *, num_batches=None,
mode="train", ...)``: ``batch_or_loader`` is one ``(inputs, targets)`` batch or an iterable of
them (the first ``num_batches`` are averaged, weighted by size), ``loss_fn(outputs, targets)``
returns a scalar. ``mode="train"`` (default) evaluates the model in training mode (BN with batch
statistics, the landscape SGD sees), ``mode="eval"`` in eval mode (running statistics). A probe
leaves the model exactly as found (parameters, ``.grad``, buffers, training flags, global RNG),
and random layers (noisy BN, dropout) see one fixed function per probe. Results are dataclasses
with ``to_dict()`` / ``to_json()``.

- :func:`gradient_path`: loss and gradient change along -g, effective beta-smoothness (3.1).
- :func:`internal_covariate_shift`: Definition 2.1, with any ``torch.optim`` optimizer.
- :func:`hvp`, :func:`top_eigenvalues` (Lanczos), :func:`hutchinson_trace`,
  :func:`spectral_density` (SLQ), :func:`curvature_along_gradient` (Theorem 4.2); whole model or
  per parameter group (``groups="layer"``, ``"block"``, a mapping or a function).
- :func:`sharpness`: the top eigenvalue tracked cheaply (warm-started), edge of stability.
- ``operator="ggn" | "fisher" | "empirical_fisher"``: Gauss-Newton and Fisher next to the Hessian.
- :func:`across_ranks`: a rank's share of the data; probes all-reduce over torch.distributed.
- :func:`effective_learning_rates`: ||w||, lr/||w||^2, angular updates and <g, w> of the layers
  followed by a normalization (scale invariance).
- :func:`gradient_bound`: Theorem 4.1 per BatchNorm layer.
- :func:`loss_surface`: 1-D/2-D surfaces along filter-normalized or given directions.
"""

from bnlab.landscape.activation_curvature import activation_curvature
from bnlab.landscape.bound import gradient_bound
from bnlab.landscape.evaluation import (
    Batch,
    BatchOrLoader,
    Curvature,
    Grouping,
    LossFn,
    Mode,
    RankShare,
    across_ranks,
)
from bnlab.landscape.gradient_path import DEFAULT_ETAS, gradient_path
from bnlab.landscape.hessian import (
    curvature_along_gradient,
    hutchinson_trace,
    hvp,
    sharpness,
    spectral_density,
    top_eigenvalues,
)
from bnlab.landscape.ics import internal_covariate_shift
from bnlab.landscape.results import (
    BatchNormGradientBound,
    CovariateShift,
    CurvatureAlongGradient,
    EffectiveLearningRates,
    Eigenpairs,
    GradientBound,
    GradientPath,
    LayerScale,
    LayerShift,
    LossSurface,
    Sharpness,
    SpectralDensity,
    TraceEstimate,
    to_json,
)
from bnlab.landscape.scale_invariance import effective_learning_rates
from bnlab.landscape.surface import filter_normalized_direction, loss_surface

__all__ = [
    "DEFAULT_ETAS",
    "Batch",
    "BatchNormGradientBound",
    "BatchOrLoader",
    "CovariateShift",
    "Curvature",
    "CurvatureAlongGradient",
    "EffectiveLearningRates",
    "Eigenpairs",
    "GradientBound",
    "GradientPath",
    "Grouping",
    "LayerScale",
    "LayerShift",
    "LossFn",
    "LossSurface",
    "Mode",
    "RankShare",
    "Sharpness",
    "SpectralDensity",
    "TraceEstimate",
    "across_ranks",
    "activation_curvature",
    "curvature_along_gradient",
    "effective_learning_rates",
    "filter_normalized_direction",
    "gradient_bound",
    "gradient_path",
    "hutchinson_trace",
    "hvp",
    "internal_covariate_shift",
    "loss_surface",
    "sharpness",
    "spectral_density",
    "to_json",
    "top_eigenvalues",
]
