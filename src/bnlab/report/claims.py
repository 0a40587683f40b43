"""The study's claims (Santurkar et al. 2018), each judged from stored metrics across seeds.

Each ``claim_N`` reduces the evidence to per-seed numbers per arm, applies rules from
:mod:`bnlab.report.verdicts` (and the small rules below), and returns a :class:`ClaimResult`
carrying the numbers, the verdict, the rule in words and the source of the rule functions.
Thresholds are module constants so the report can quote them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from bnlab.report.claim import ClaimResult, source_of
from bnlab.report.conditioning import conditioning_claim
from bnlab.report.evidence import (
    MOVING_AVERAGE,
    Run,
    StudyEvidence,
    distribution_shift,
    final_test_accuracy,
    ics_layers,
    median,
    probe_series,
    steps_to_accuracy,
)
from bnlab.report.verdicts import (
    Spread,
    Verdict,
    all_of,
    at_least,
    better,
    not_smaller,
    smaller,
)

SPEED_MARGIN = 0.1  # BN must need at least 10% fewer steps
SENSITIVITY_MARGIN = 0.2
ACCURACY_TOLERANCE = 0.03  # "about as well": within 3 accuracy points
ICS_MARGIN = 0.2  # "does not reduce": BN's ICS at least 80% of the standard network's
SMOOTHNESS_MARGIN = 0.1
SHIFT_MARGIN = 0.0
TRAINS_ACCURACY = (
    0.75  # final train accuracy that counts as "trains": above chance (2 or 10 classes)
)
BOUND_TOLERANCE = 1e-4  # float32 rounding on a ratio that can be exactly 1

Reducer = Callable[[Run], float]


def per_seed(runs: Sequence[Run], reduce: Reducer) -> Spread:
    """One number per run (seed), as a Spread."""
    return Spread.of([reduce(r) for r in sorted(runs, key=lambda r: r.seed)])


def series_median(probe: str, value: str) -> Reducer:
    """A run's median over training of one probe quantity (see ``probe_series``)."""

    def reduce(run: Run) -> float:
        return median(probe_series(run, probe, value)[1])

    return reduce


def _steps_or_budget(run: Run, target: float) -> float:
    """Steps to the target accuracy; a run that never reaches it counts as its budget + 1."""
    steps = steps_to_accuracy(run, target)
    budget = float(run.config.get("steps", 0))
    return steps if math.isfinite(steps) else budget + 1


# --------------------------------------------------------------------------- claim 1


def larger_rates_rule(bn_largest: float, standard_largest: float) -> Verdict:
    """Reproduced when the largest rate at which every BN seed trains exceeds the standard
    network's; not reproduced when it is smaller; inconclusive when equal (the grid does not
    separate them) or when either arm trains at no rate at all."""
    if not (math.isfinite(bn_largest) and math.isfinite(standard_largest)):
        return Verdict.INCONCLUSIVE
    if bn_largest > standard_largest:
        return Verdict.REPRODUCED
    if bn_largest < standard_largest:
        return Verdict.NOT_REPRODUCED
    return Verdict.INCONCLUSIVE


def trains(run: Run) -> bool:
    """A run trains at its rate when it did not diverge and its final training accuracy (mean
    of the last rows) is at least TRAINS_ACCURACY: far above chance, though maybe not yet at
    the target within the step budget."""
    if run.state != "finished" or not run.train:
        return False
    last = [float(r.get("accuracy", math.nan)) for r in run.train[-MOVING_AVERAGE:]]
    return sum(last) / len(last) >= TRAINS_ACCURACY


def largest_trainable_rate(evidence: StudyEvidence, arm: str) -> float:
    """The largest learning rate of the grid at which every seed of ``arm`` trains."""
    good = []
    for lr in evidence.settings.get("learning_rates", []):
        runs = evidence.arm(arm, lr=lr)
        if runs and all(trains(r) for r in runs):
            good.append(lr)
    return max(good, default=math.nan)


def claim_1(evidence: StudyEvidence) -> ClaimResult:
    target = float(evidence.settings.get("target_accuracy", 0.9))
    ref = evidence.settings.get("reference_lr")
    bn = per_seed(evidence.arm("bn"), lambda r: _steps_or_budget(r, target))
    std = per_seed(evidence.arm("standard"), lambda r: _steps_or_budget(r, target))
    bn_rate = largest_trainable_rate(evidence, "bn")
    std_rate = largest_trainable_rate(evidence, "standard")
    parts = {
        "BN reaches the target in fewer steps": smaller(bn, std, SPEED_MARGIN),
        "BN trains at larger learning rates": larger_rates_rule(bn_rate, std_rate),
    }
    return ClaimResult(
        id=1,
        title="BN trains faster and tolerates larger learning rates",
        statement=(
            "Standard vs BN network over a learning-rate grid: with BN the training accuracy "
            "reaches the target in fewer steps, and training still succeeds at learning rates "
            "where the standard network fails."
        ),
        verdict=all_of(list(parts.values())),
        rule=(
            f"Steps to a {target:.0%} moving-average training accuracy at the reference rate "
            f"{ref}: a run that never reaches it counts as its step budget + 1; reproduced when "
            f"BN's seed median is at least {SPEED_MARGIN:.0%} lower with separated seed ranges. "
            "Largest trainable rate: the largest grid rate at which every seed trains (does not "
            f"diverge and ends with a training accuracy of at least {TRAINS_ACCURACY:.0%}); BN's "
            "must be larger. Both parts must hold."
        ),
        rule_source=source_of(smaller, trains, larger_rates_rule),
        numbers={
            f"BN, steps to {target:.0%} train accuracy (lr {ref})": bn,
            f"standard, steps to {target:.0%} train accuracy (lr {ref})": std,
            "BN, largest trainable learning rate": bn_rate,
            "standard, largest trainable learning rate": std_rate,
        },
        parts=parts,
        explanation=(
            "On a small, easy dataset the standard network may already train quickly at the "
            "reference rate, and a coarse grid can put both networks' limits on the same rate."
        ),
        figures=["training_curves"],
    )


# --------------------------------------------------------------------------- claim 2


def sensitivity(evidence: StudyEvidence, arm: str) -> Spread:
    """Per seed: max - min of the final test accuracy over the init scales (a diverged run has
    accuracy 0 here: it learned nothing usable)."""
    scales = evidence.settings.get("init_scales", [])
    ref = evidence.settings.get("reference_lr")
    by_seed: dict[int, list[float]] = {}
    for scale in scales:
        for run in evidence.select(arms=[arm], lr=ref, init_scale=scale):
            acc = final_test_accuracy(run)
            by_seed.setdefault(run.seed, []).append(acc if math.isfinite(acc) else 0.0)
    return Spread.of([max(v) - min(v) for _, v in sorted(by_seed.items()) if len(v) == len(scales)])


def claim_2(evidence: StudyEvidence) -> ClaimResult:
    bn, std = sensitivity(evidence, "bn"), sensitivity(evidence, "standard")
    scales = evidence.settings.get("init_scales", [])
    verdict = smaller(bn, std, SENSITIVITY_MARGIN)
    return ClaimResult(
        id=2,
        title="BN makes training less sensitive to the initialization scale",
        statement=(
            "Multiplying the initial weights by a scale hurts the standard network much more "
            "than the BN network."
        ),
        verdict=verdict,
        rule=(
            f"Per seed, the range (max - min) of final test accuracy over the init scales "
            f"{scales}; reproduced when BN's seed median is at least {SENSITIVITY_MARGIN:.0%} "
            "smaller than the standard network's with separated seed ranges."
        ),
        rule_source=source_of(smaller),
        numbers={
            "BN, accuracy range over init scales": bn,
            "standard, accuracy range over init scales": std,
        },
        explanation=(
            "If the scales in the grid are all benign for this architecture, neither network "
            "is hurt and the ranges are both small."
        ),
        figures=["init_scale"],
    )


# --------------------------------------------------------------------------- claim 3


def claim_3(evidence: StudyEvidence) -> ClaimResult:
    acc = {
        a: per_seed(evidence.arm(a), final_test_accuracy) for a in ("noisy_bn", "bn", "standard")
    }
    shift = {a: per_seed(evidence.arm(a), distribution_shift) for a in ("noisy_bn", "bn")}
    parts = {
        "noisy BN about as accurate as BN": at_least(
            acc["noisy_bn"], acc["bn"], ACCURACY_TOLERANCE
        ),
        "noisy BN more accurate than standard": better(acc["noisy_bn"], acc["standard"], 0.0),
        "the noise really shifts the distribution (more than BN)": better(
            shift["noisy_bn"], shift["bn"], SHIFT_MARGIN
        ),
    }
    return ClaimResult(
        id=3,
        title="Noisy BN trains about as well as BN despite large distribution shift",
        statement=(
            "BN with injected time-varying noise (a distribution shift far larger than the "
            "standard network's) still trains about as well as BN and better than the standard "
            "network: controlling the layer-input distribution is not what makes BN work."
        ),
        verdict=all_of(list(parts.values())),
        rule=(
            "Final test accuracy per seed: noisy BN's median within "
            f"{ACCURACY_TOLERANCE:.0%} of BN's; noisy BN's median above the standard network's "
            "with separated seed ranges; and the watched layer's distribution shift (mean "
            "quantile movement per checkpoint interval, in units of its std) larger for noisy "
            "BN than for BN, with separated seed ranges. All three must hold."
        ),
        rule_source=source_of(at_least, better),
        numbers={
            "noisy BN, final test accuracy": acc["noisy_bn"],
            "BN, final test accuracy": acc["bn"],
            "standard, final test accuracy": acc["standard"],
            "noisy BN, distribution shift": shift["noisy_bn"],
            "BN, distribution shift": shift["bn"],
        },
        parts=parts,
        explanation=(
            "When every network reaches nearly the same accuracy on an easy dataset, 'better "
            "than the standard network' cannot be separated from seed noise; the paper's "
            "contrast is on CIFAR-10 with VGG-16."
        ),
        figures=["activation_distributions"],
    )


# --------------------------------------------------------------------------- claim 4


def ics_reducer(kind: str, layers: Sequence[str]) -> Reducer:
    """Median over training and layers of ||G - G'|| ("l2") or 1 - cos(G, G') ("cos")."""

    def reduce(run: Run) -> float:
        values: list[float] = []
        for layer in layers:
            _, series = probe_series(run, "internal_covariate_shift", f"ics_{kind}:{layer}")
            values += [1.0 - v if kind == "cos" else v for v in series]
        return median(values)

    return reduce


def claim_4(evidence: StudyEvidence) -> ClaimResult:
    bn_runs, std_runs = evidence.arm("bn"), evidence.arm("standard")
    layers = ics_layers(bn_runs + std_runs)
    numbers: dict[str, Spread | float | int | str | None] = {}
    parts = {}
    for kind, label in (("l2", "||G - G'||_2"), ("cos", "1 - cos(G, G')")):
        bn = per_seed(bn_runs, ics_reducer(kind, layers))
        std = per_seed(std_runs, ics_reducer(kind, layers))
        numbers[f"BN, {label}"] = bn
        numbers[f"standard, {label}"] = std
        parts[f"BN does not reduce {label}"] = not_smaller(bn, std, ICS_MARGIN)
    return ClaimResult(
        id=4,
        title="BN does not reduce internal covariate shift",
        statement=(
            "Measured as in Definition 2.1 (the change of a layer's gradient when the earlier "
            "layers take their update), ICS is not smaller with BN, and can be larger."
        ),
        verdict=all_of(list(parts.values())),
        rule=(
            f"Per seed, the median over probed steps and layers {layers} of ||G - G'|| and of "
            f"1 - cos(G, G'); reproduced when BN's seed median is at least "
            f"{1 - ICS_MARGIN:.0%} of the standard network's for both; not reproduced when BN's "
            "is smaller beyond that with separated seed ranges."
        ),
        rule_source=source_of(not_smaller),
        numbers=numbers,
        parts=parts,
        explanation=(
            "The paper measures ICS on VGG-16 (CIFAR-10) and a 25-layer deep linear network. In "
            "a two-convolution network few layers precede the measured ones, and the standard "
            "network's larger gradients make its G move more; the l2 difference scales with the "
            "gradient norm, the cosine does not."
        ),
        figures=["covariate_shift"],
    )


# ------------------------------------------------------------------------ claims 5-7


def _smoothness_claim(
    evidence: StudyEvidence, claim_id: int, value: str, title: str, statement: str, label: str
) -> ClaimResult:
    bn = per_seed(evidence.arm("bn"), series_median("gradient_path", value))
    std = per_seed(evidence.arm("standard"), series_median("gradient_path", value))
    return ClaimResult(
        id=claim_id,
        title=title,
        statement=statement,
        verdict=smaller(bn, std, SMOOTHNESS_MARGIN),
        rule=(
            f"Per seed, the median over probed steps of the {label}; reproduced when BN's seed "
            f"median is at least {SMOOTHNESS_MARGIN:.0%} smaller than the standard network's "
            "with separated seed ranges; not reproduced when it is not smaller at all."
        ),
        rule_source=source_of(smaller),
        numbers={f"BN, {label}": bn, f"standard, {label}": std},
        explanation=(
            "Early in training both landscapes are rough and late both are flat; a short run "
            "or a very small network narrows the gap."
        ),
        figures=["landscape"],
    )


def claim_5(evidence: StudyEvidence) -> ClaimResult:
    return _smoothness_claim(
        evidence,
        5,
        "loss_range",
        "BN reduces the loss variation along the gradient",
        "Moving along the gradient, the loss of the BN network changes over a smaller range.",
        "loss range along the gradient path",
    )


def claim_6(evidence: StudyEvidence) -> ClaimResult:
    return _smoothness_claim(
        evidence,
        6,
        "gradient_change",
        "BN makes gradients more predictive",
        "Moving along the gradient, the BN network's gradient changes less (l2).",
        "largest gradient change along the path",
    )


def claim_7(evidence: StudyEvidence) -> ClaimResult:
    return _smoothness_claim(
        evidence,
        7,
        "beta",
        "BN lowers the effective beta-smoothness",
        "The largest ratio ||g(w) - g(w - eta g)|| / ||eta g|| along the path is smaller with BN.",
        "effective beta-smoothness",
    )


# --------------------------------------------------------------------------- claim 8


def claim_8(evidence: StudyEvidence) -> ClaimResult:
    bn_acc = per_seed(evidence.arm("bn"), final_test_accuracy)
    std_range = per_seed(evidence.arm("standard"), series_median("gradient_path", "loss_range"))
    bn_shift = per_seed(evidence.arm("bn"), distribution_shift)
    numbers: dict[str, Spread | float | int | str | None] = {
        "BN, final test accuracy": bn_acc,
        "standard, loss range along the gradient": std_range,
        "BN, distribution shift": bn_shift,
    }
    parts = {}
    for arm, name in (("l1", "l1"), ("l2", "l2"), ("linf", "l-infinity")):
        runs = evidence.arm(arm)
        if not runs:
            continue
        acc = per_seed(runs, final_test_accuracy)
        loss_range = per_seed(runs, series_median("gradient_path", "loss_range"))
        shift = per_seed(runs, distribution_shift)
        numbers[f"{name}, final test accuracy"] = acc
        numbers[f"{name}, loss range along the gradient"] = loss_range
        numbers[f"{name}, distribution shift"] = shift
        parts[f"{name} trains comparably to BN"] = at_least(acc, bn_acc, ACCURACY_TOLERANCE)
        parts[f"{name} smooths like BN (smoother than standard)"] = smaller(
            loss_range, std_range, SMOOTHNESS_MARGIN
        )
        if arm != "l2":  # bnlab's l2 BatchNorm is BatchNorm itself: same shift by construction
            parts[f"{name} distribution shifts more than BN's"] = better(
                shift, bn_shift, SHIFT_MARGIN
            )
    return ClaimResult(
        id=8,
        title="The smoothing is not unique to BN: lp normalizations",
        statement=(
            "Normalizing by the l1, l2 or l-infinity spread instead of the standard deviation "
            "trains comparably (or better) and smooths the landscape comparably, while the "
            "layer distributions shift more than with BN."
        ),
        verdict=all_of(list(parts.values())),
        rule=(
            f"Per variant: final test accuracy within {ACCURACY_TOLERANCE:.0%} of BN's (seed "
            f"medians); loss range along the gradient at least {SMOOTHNESS_MARGIN:.0%} below the "
            "standard network's with separated seed ranges; distribution shift above BN's with "
            "separated seed ranges (l1 and l-infinity only: l2 BatchNorm divides by "
            "sqrt(var + eps), which is BatchNorm itself). Every part of every variant must hold."
        ),
        rule_source=source_of(at_least, smaller, better),
        numbers=numbers,
        parts=parts,
        explanation=(
            "The distribution-shift part is the weakest: with a fixed probe batch and few "
            "checkpoints the movement of a single layer's distribution is noisy, and lp "
            "variants rescale their outputs differently (l-infinity divides by the max)."
        ),
        figures=["lp_variants"],
    )


# --------------------------------------------------------------------------- claim 10


def bound_rule(ratios: Sequence[float]) -> Verdict:
    """Theorem 4.1 holds when every measured ||dL/dx|| / bound <= 1 + BOUND_TOLERANCE; one
    violation is enough for not reproduced; no measurement is inconclusive."""
    finite = [r for r in ratios if math.isfinite(r)]
    if not finite:
        return Verdict.INCONCLUSIVE
    if max(finite) <= 1.0 + BOUND_TOLERANCE:
        return Verdict.REPRODUCED
    return Verdict.NOT_REPRODUCED


def claim_10(evidence: StudyEvidence) -> ClaimResult:
    runs = [r for r in evidence.arm("bn") if r.measurements.get("gradient_bound")]
    numbers: dict[str, Spread | float | int | str | None] = {}
    ratios: list[float] = []
    layers: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        for entry in run.measurements["gradient_bound"]["layers"]:
            per = layers.setdefault(entry["layer"], {"ratio": [], "lipschitz": []})
            per["ratio"].append(float(entry["ratio"]))
            per["lipschitz"].append(float(entry["lipschitz_ratio"]))
            ratios.append(float(entry["channel_ratio_max"]))
    for layer, values in layers.items():
        numbers[f"{layer}: ||dL/dx|| / bound"] = Spread.of(values["ratio"])
        numbers[f"{layer}: ||dL/dx|| / ||dL/dy||"] = Spread.of(values["lipschitz"])
    numbers["largest per-channel ratio, all layers and seeds"] = max(ratios, default=math.nan)
    return ClaimResult(
        id=10,
        title="Theorem 4.1 holds on the trained network",
        statement=(
            "For every BN layer, the gradient with respect to the layer input is bounded by "
            "gamma^2 / sigma^2 times the output gradient with its projections on 1 and on x_hat "
            "removed (Santurkar et al., Theorem 4.1)."
        ),
        verdict=bound_rule(ratios),
        rule=(
            "On the final weights of every BN seed, per layer and channel, the measured "
            f"||dL/dx|| over the bound; reproduced when all are <= 1 + {BOUND_TOLERANCE:g} "
            "(float32 rounding), not reproduced on any violation."
        ),
        rule_source=source_of(bound_rule),
        numbers=numbers,
        explanation="A violation would point to a BN backward that differs from the theorem's.",
        figures=["gradient_bound"],
    )


# --------------------------------------------------------------------------- claim 11


def claim_11(evidence: StudyEvidence) -> ClaimResult:
    numbers: dict[str, Spread | float | int | str | None] = {}
    parts = {}
    for value, label in (
        ("top_eigenvalue", "top Hessian eigenvalue"),
        ("curvature", "curvature along the gradient g^T H g / ||g||^2"),
    ):
        probe = "top_eigenvalues" if value == "top_eigenvalue" else "curvature_along_gradient"
        bn = per_seed(evidence.arm("bn"), series_median(probe, value))
        std = per_seed(evidence.arm("standard"), series_median(probe, value))
        numbers[f"BN, {label}"] = bn
        numbers[f"standard, {label}"] = std
        parts[f"BN lowers the {label}"] = smaller(bn, std, SMOOTHNESS_MARGIN)
    return ClaimResult(
        id=11,
        title="Curvature: top eigenvalue and curvature along the gradient",
        statement=(
            "Over training, the BN network's loss has lower curvature in the direction of the "
            "gradient (Theorem 4.2) and a smaller top Hessian eigenvalue."
        ),
        verdict=all_of(list(parts.values())),
        rule=(
            "Per seed, the median over probed steps (training-mode Hessian of the step's batch); "
            f"reproduced when BN's seed median is at least {SMOOTHNESS_MARGIN:.0%} below the "
            "standard network's with separated seed ranges, for both quantities."
        ),
        rule_source=source_of(smaller),
        numbers=numbers,
        parts=parts,
        explanation=(
            "Theorem 4.2 bounds curvature along the gradient, not the top eigenvalue; BN "
            "networks can have a large top eigenvalue in directions SGD does not take "
            "(e.g. along the scale-invariant weights)."
        ),
        figures=["curvature", "spectral_density"],
    )


def claim_9(evidence: StudyEvidence) -> ClaimResult:
    return conditioning_claim(evidence.conditioning)


CLAIM_FUNCTIONS: dict[int, Callable[[StudyEvidence], ClaimResult]] = {
    1: claim_1,
    2: claim_2,
    3: claim_3,
    4: claim_4,
    5: claim_5,
    6: claim_6,
    7: claim_7,
    8: claim_8,
    9: claim_9,
    10: claim_10,
    11: claim_11,
}


def judge(evidence: StudyEvidence, claims: Sequence[int] | None = None) -> list[ClaimResult]:
    """The claims the study declared (all 11 by default), in order."""
    ids = claims if claims is not None else evidence.manifest.get("claims", list(CLAIM_FUNCTIONS))
    return [CLAIM_FUNCTIONS[i](evidence) for i in ids]
