"""The study's claims (Santurkar et al. 2018), each judged from stored metrics across seeds.

Each ``claim_N`` reduces the evidence to per-seed numbers per arm, applies rules from
:mod:`bnlab.report.verdicts` (and the small rules below), and returns a :class:`ClaimResult`
carrying the numbers, the verdict, the rule in words, the source of the rule functions, the
settings it was judged in and notes computed from the evidence (the measured gaps and seed
ranges of every part). A claim the paper makes in both of its settings (VGG and the deep
linear network) is judged in each setting the study ran, one part per setting, and holds only
if it holds in every one. Thresholds are module constants, fixed before any result, so the
report can quote them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from bnlab.report.claim import ClaimResult, source_of
from bnlab.report.conditioning_claim import conditioning_claim
from bnlab.report.evidence import (
    MOVING_AVERAGE,
    Run,
    StudyEvidence,
    distribution_shift,
    final_test_accuracy,
    final_train_loss,
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
LOSS_FACTOR = 2.0  # "trains comparably" on regression: final training loss within 2x of BN's
ICS_MARGIN = 0.2  # "does not reduce": BN's ICS at least 80% of the standard network's
SMOOTHNESS_MARGIN = 0.1
SHIFT_MARGIN = 0.0
TRAINS_ACCURACY = 0.75  # final train accuracy that counts as "trains": far above chance
BOUND_TOLERANCE = 1e-4  # float32 rounding on a ratio that can be exactly 1

Reducer = Callable[[Run], float]
Numbers = dict[str, Spread | float | int | str | None]


def per_seed(runs: Sequence[Run], reduce: Reducer) -> Spread:
    """One number per run (seed), as a Spread."""
    return Spread.of([reduce(r) for r in sorted(runs, key=lambda r: r.seed)])


def series_median(probe: str, value: str) -> Reducer:
    """A run's median over training of one probe quantity (see ``probe_series``)."""

    def reduce(run: Run) -> float:
        return median(probe_series(run, probe, value)[1])

    return reduce


SMOOTHNESS_MEASURES = {
    "loss_range": "loss range along the gradient path",
    "gradient_change": "largest gradient change along the path",
    "beta": "effective beta-smoothness",
}
"""The gradient path's quantities claims 5, 6 and 7 compare (see ``probe_series``), with the
words the report uses for them."""


def smoothness(runs: Sequence[Run], value: str) -> Spread:
    """Per seed, the median over probed steps of one of :data:`SMOOTHNESS_MEASURES` (claims
    5-8 compare these; the report's extension section shows them for the other arms)."""
    return per_seed(runs, series_median("gradient_path", value))


def layers_median(probe: str, value: str, layers: Sequence[str]) -> Reducer:
    """A run's median over training and ``layers`` of ``value:<layer>`` of a probe."""

    def reduce(run: Run) -> float:
        values: list[float] = []
        for layer in layers:
            values += probe_series(run, probe, f"{value}:{layer}")[1]
        return median(values)

    return reduce


def compared(name: str, verdict: Verdict, a: tuple[str, Spread], b: tuple[str, Spread]) -> str:
    """A note on one part, from its numbers: both arms' medians and ranges, their ratio, and
    whether the seed ranges separate."""
    (a_label, a_spread), (b_label, b_spread) = a, b
    text = f"{name}: {verdict.value}. {a_label} {a_spread.describe()} vs {b_label} "
    text += f"{b_spread.describe()}"
    if a_spread.finite and b_spread.finite:
        if b_spread.median != 0:
            text += f"; ratio of medians {a_spread.median / b_spread.median:.3g}"
        overlap = a_spread.low <= b_spread.high and b_spread.low <= a_spread.high
        text += "; seed ranges overlap" if overlap else "; seed ranges separate"
    if len(a_spread.finite) < 2 or len(b_spread.finite) < 2:
        text += "; fewer than two finite seeds in an arm"
    return text + "."


class Judged:
    """The parts of a claim with their notes, collected as the claim is judged."""

    def __init__(self) -> None:
        self.parts: dict[str, Verdict] = {}
        self.notes: list[str] = []
        self.numbers: Numbers = {}

    def part(
        self,
        name: str,
        verdict: Verdict,
        a: tuple[str, Spread],
        b: tuple[str, Spread],
        where: str = "",
    ) -> None:
        """Record part ``name`` with the two arms' numbers (labelled ``where | label`` when
        the claim spans settings or rates) and a note on its gap."""
        self.parts[name] = verdict
        for label, spread in (a, b):
            self.numbers[f"{where} | {label}" if where else label] = spread
        self.notes.append(compared(name, verdict, a, b))

    def verdict(self) -> Verdict:
        return all_of(list(self.parts.values()))

    def explanation(self) -> str:
        """Which parts decided a verdict other than reproduced, from their own notes."""
        failed = [n for n, v in self.parts.items() if v is Verdict.NOT_REPRODUCED]
        open_ = [n for n, v in self.parts.items() if v is Verdict.INCONCLUSIVE]
        words = []
        if failed:
            words.append(f"Not reproduced by: {'; '.join(failed)}.")
        if open_:
            words.append(f"Inconclusive: {'; '.join(open_)}.")
        if not self.parts:
            words.append("No part could be judged: the study folder lacks the runs it needs.")
        return " ".join(words)


def _where(evidence: StudyEvidence, setting: str) -> str:
    """The setting's title as a numbers prefix when the study has several settings."""
    return evidence.title(setting) if len(evidence.setting_names()) > 1 else ""


def judged_in(evidence: StudyEvidence, settings: Sequence[str]) -> list[str]:
    """The titles of the settings a claim was judged in, with their seed counts."""
    out = []
    for name in settings:
        seeds = evidence.setting(name).get("seeds", [])
        out.append(f"{evidence.title(name)} ({len(seeds)} seeds)")
    return out


def _result(
    evidence: StudyEvidence,
    claim_id: int,
    title: str,
    statement: str,
    rule: str,
    rules: Sequence[Callable[..., object]],
    judged: Judged,
    settings: Sequence[str],
    figures: list[str],
    extra_notes: Sequence[str] = (),
) -> ClaimResult:
    return ClaimResult(
        id=claim_id,
        title=title,
        statement=statement,
        verdict=judged.verdict(),
        rule=rule,
        rule_source=source_of(*rules),
        numbers=judged.numbers,
        parts=judged.parts,
        explanation=judged.explanation(),
        figures=figures,
        notes=[*judged.notes, *extra_notes],
        settings=judged_in(evidence, settings),
    )


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
    """The largest learning rate of the main setting's grid at which every seed of ``arm``
    trains."""
    good = []
    for lr in evidence.settings.get("learning_rates", []):
        runs = evidence.arm(arm, lr=lr)
        if runs and all(trains(r) for r in runs):
            good.append(lr)
    return max(good, default=math.nan)


def claim_1(evidence: StudyEvidence) -> ClaimResult:
    target = float(evidence.settings.get("target_accuracy", 0.9))
    ref = evidence.settings.get("reference_lr")
    judged = Judged()
    bn = per_seed(evidence.arm("bn"), lambda r: _steps_or_budget(r, target))
    std = per_seed(evidence.arm("standard"), lambda r: _steps_or_budget(r, target))
    judged.part(
        "BN reaches the target in fewer steps",
        smaller(bn, std, SPEED_MARGIN),
        (f"BN, steps to {target:.0%} train accuracy (lr {ref})", bn),
        (f"standard, steps to {target:.0%} train accuracy (lr {ref})", std),
    )
    bn_rate = largest_trainable_rate(evidence, "bn")
    std_rate = largest_trainable_rate(evidence, "standard")
    name = "BN trains at larger learning rates"
    judged.parts[name] = larger_rates_rule(bn_rate, std_rate)
    judged.numbers["BN, largest trainable learning rate"] = bn_rate
    judged.numbers["standard, largest trainable learning rate"] = std_rate
    judged.notes.append(
        f"{name}: {judged.parts[name].value}. Largest rate of the grid "
        f"{evidence.settings.get('learning_rates', [])} at which every seed trains: BN "
        f"{bn_rate:g}, standard {std_rate:g}."
    )
    return _result(
        evidence,
        1,
        "BN trains faster and tolerates larger learning rates",
        "Standard vs BN network over a learning-rate grid: with BN the training accuracy "
        "reaches the target in fewer steps, and training still succeeds at learning rates "
        "where the standard network fails.",
        f"Steps to a {target:.0%} moving-average training accuracy at the reference rate "
        f"{ref}: a run that never reaches it counts as its step budget + 1; reproduced when "
        f"BN's seed median is at least {SPEED_MARGIN:.0%} lower with separated seed ranges. "
        "Largest trainable rate: the largest grid rate at which every seed trains (does not "
        f"diverge and ends with a training accuracy of at least {TRAINS_ACCURACY:.0%}); BN's "
        "must be larger. Both parts must hold.",
        (smaller, trains, larger_rates_rule),
        judged,
        [evidence.main],
        ["training_curves"],
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
    scales = evidence.settings.get("init_scales", [])
    judged = Judged()
    bn, std = sensitivity(evidence, "bn"), sensitivity(evidence, "standard")
    judged.part(
        "BN's accuracy varies less over init scales",
        smaller(bn, std, SENSITIVITY_MARGIN),
        ("BN, accuracy range over init scales", bn),
        ("standard, accuracy range over init scales", std),
    )
    return _result(
        evidence,
        2,
        "BN makes training less sensitive to the initialization scale",
        "Multiplying the initial weights by a scale hurts the standard network much more "
        "than the BN network.",
        f"Per seed, the range (max - min) of final test accuracy over the init scales "
        f"{scales}; reproduced when BN's seed median is at least {SENSITIVITY_MARGIN:.0%} "
        "smaller than the standard network's with separated seed ranges.",
        (smaller,),
        judged,
        [evidence.main],
        ["init_scale"],
    )


# --------------------------------------------------------------------------- claim 3


def claim_3(evidence: StudyEvidence) -> ClaimResult:
    arm = evidence.arm
    acc = {a: per_seed(arm(a), final_test_accuracy) for a in ("noisy_bn", "bn", "standard")}
    shift = {a: per_seed(arm(a), distribution_shift) for a in ("noisy_bn", "standard")}
    judged = Judged()
    judged.part(
        "noisy BN about as accurate as BN",
        at_least(acc["noisy_bn"], acc["bn"], ACCURACY_TOLERANCE),
        ("noisy BN, final test accuracy", acc["noisy_bn"]),
        ("BN, final test accuracy", acc["bn"]),
    )
    judged.part(
        "noisy BN more accurate than standard",
        better(acc["noisy_bn"], acc["standard"], 0.0),
        ("noisy BN, final test accuracy", acc["noisy_bn"]),
        ("standard, final test accuracy", acc["standard"]),
    )
    judged.part(
        "noisy BN's layer distributions shift more than the standard network's",
        better(shift["noisy_bn"], shift["standard"], SHIFT_MARGIN),
        ("noisy BN, distribution shift", shift["noisy_bn"]),
        ("standard, distribution shift", shift["standard"]),
    )
    slots = evidence.settings.get("highlight_slots", [])
    hypothesis = []
    gap = acc["bn"].median - acc["standard"].median
    if acc["noisy_bn"].median < TRAINS_ACCURACY:
        hypothesis.append(
            f"Noisy BN did not train: final test accuracy {acc['noisy_bn'].median:.3g}, below "
            f"{TRAINS_ACCURACY:.0%}; its noise constants are in the protocol table."
        )
    elif (
        judged.parts["noisy BN more accurate than standard"] is not Verdict.REPRODUCED
        and gap < ACCURACY_TOLERANCE
    ):
        hypothesis.append(
            "Hypothesis (untested): the data set leaves little room above the standard "
            f"network (BN - standard accuracy gap measured here: {gap:+.3f}); the paper's "
            "contrast is on CIFAR-10, where the gap is about 3 points. Evidence that would "
            "test it: the same runs with --data cifar10:PATH."
        )
    return _result(
        evidence,
        3,
        "Noisy BN trains about as well as BN despite a larger distribution shift",
        "BN with injected time-varying noise (Algorithm 1) makes the layer distributions shift "
        "more than in the standard network, yet trains about as well as BN and better than "
        "the standard network: controlling the layer-input distribution is not what makes BN "
        "work.",
        "Final test accuracy per seed: noisy BN's median within "
        f"{ACCURACY_TOLERANCE:.0%} of BN's; noisy BN's median above the standard network's "
        "with separated seed ranges; and the distribution shift of the norm slots after the "
        f"highlighted layers ({', '.join(slots)}) larger for noisy BN than for the standard "
        "network, with separated seed ranges. The shift is the mean movement of 20 quantiles "
        "between consecutive records of the activations the training step computed (noise "
        "draw included), in units of the pooled std. All three must hold.",
        (at_least, better),
        judged,
        [evidence.main],
        ["activation_distributions"],
        hypothesis,
    )


# --------------------------------------------------------------------------- claim 4


def _ics_rates(evidence: StudyEvidence, setting: str) -> list[float]:
    knobs = evidence.setting(setting)
    rates = [knobs.get("reference_lr"), *knobs.get("ics_rates", [])]
    return [float(r) for r in dict.fromkeys(rates) if r is not None]


def claim_4(evidence: StudyEvidence) -> ClaimResult:
    judged = Judged()
    used = []
    for setting in evidence.setting_names():
        knobs = evidence.setting(setting)
        scale = float(knobs.get("loss_scale", 1.0))
        for lr in _ics_rates(evidence, setting):
            bn_runs = evidence.arm("bn", lr=lr, setting=setting)
            std_runs = evidence.arm("standard", lr=lr, setting=setting)
            layers = ics_layers(bn_runs + std_runs, knobs.get("highlight_layers", []))
            if not (bn_runs and std_runs and layers):
                continue
            used.append(setting)
            where = f"{evidence.title(setting)}, lr {lr / scale:g}, layers {', '.join(layers)}"
            for kind, label in (("l2", "||G - G'||_2"), ("cos", "1 - cos(G, G')")):
                reduce = ics_reducer(kind, layers)
                bn, std = per_seed(bn_runs, reduce), per_seed(std_runs, reduce)
                judged.part(
                    f"{where}: BN does not reduce {label}",
                    not_smaller(bn, std, ICS_MARGIN),
                    (f"BN, {label}", bn),
                    (f"standard, {label}", std),
                    where,
                )
    return _result(
        evidence,
        4,
        "BN does not reduce internal covariate shift",
        "Measured as in Definition 2.1 (the change of a layer's gradient when the earlier "
        "layers take their update), ICS is not smaller with BN, and can be larger.",
        "Per seed, the median over probed steps and the highlighted layers (the paper's "
        "layers 5 and 10 of VGG, 9 and 17 of the DLN) of ||G - G'|| and of 1 - cos(G, G'), "
        "at the reference rate and the paper's second ICS rate (0.01 VGG, 1e-7 DLN) where "
        f"run; reproduced when BN's seed median is at least {1 - ICS_MARGIN:.0%} of the "
        "standard network's for every setting, rate and measure; not reproduced when BN's "
        "is smaller beyond that with separated seed ranges in any.",
        (not_smaller,),
        judged,
        list(dict.fromkeys(used)),
        ["covariate_shift"],
    )


def ics_reducer(kind: str, layers: Sequence[str]) -> Reducer:
    """Median over training and layers of ||G - G'|| ("l2") or 1 - cos(G, G') ("cos")."""

    def reduce(run: Run) -> float:
        values: list[float] = []
        for layer in layers:
            _, series = probe_series(run, "internal_covariate_shift", f"ics_{kind}:{layer}")
            values += [1.0 - v if kind == "cos" else v for v in series]
        return median(values)

    return reduce


# ------------------------------------------------------------------------ claims 5-7


def _smoothness_claim(
    evidence: StudyEvidence, claim_id: int, value: str, title: str, statement: str
) -> ClaimResult:
    label = SMOOTHNESS_MEASURES[value]
    judged = Judged()
    used = []
    for setting in evidence.setting_names():
        bn = smoothness(evidence.arm("bn", setting=setting), value)
        std = smoothness(evidence.arm("standard", setting=setting), value)
        if not (bn.n and std.n):
            continue
        used.append(setting)
        judged.part(
            f"{evidence.title(setting)}: BN lowers the {label}",
            smaller(bn, std, SMOOTHNESS_MARGIN),
            (f"BN, {label}", bn),
            (f"standard, {label}", std),
            _where(evidence, setting),
        )
    return _result(
        evidence,
        claim_id,
        title,
        statement,
        f"Per seed, the median over probed steps of the {label}, along the gradient over the "
        "paper's step sizes ([1/2, 4] x lr VGG, [1/100, 30] x lr DLN); reproduced when BN's "
        f"seed median is at least {SMOOTHNESS_MARGIN:.0%} smaller than the standard network's "
        "with separated seed ranges in every setting; not reproduced when it is not smaller "
        "at all in any.",
        (smaller,),
        judged,
        used,
        ["landscape"],
    )


def claim_5(evidence: StudyEvidence) -> ClaimResult:
    return _smoothness_claim(
        evidence,
        5,
        "loss_range",
        "BN reduces the loss variation along the gradient",
        "Moving along the gradient, the loss of the BN network changes over a smaller range.",
    )


def claim_6(evidence: StudyEvidence) -> ClaimResult:
    return _smoothness_claim(
        evidence,
        6,
        "gradient_change",
        "BN makes gradients more predictive",
        "Moving along the gradient, the BN network's gradient changes less (l2).",
    )


def claim_7(evidence: StudyEvidence) -> ClaimResult:
    return _smoothness_claim(
        evidence,
        7,
        "beta",
        "BN lowers the effective beta-smoothness",
        "The largest ratio ||g(w) - g(w - eta g)|| / ||eta g|| along the path is smaller with BN.",
    )


# --------------------------------------------------------------------------- claim 8


def _neg_log_loss(run: Run) -> float:
    """-log10 of the final training loss (higher is better, so ``at_least`` applies)."""
    loss = final_train_loss(run)
    return -math.log10(loss) if loss > 0 else math.nan


def claim_8(evidence: StudyEvidence) -> ClaimResult:
    judged = Judged()
    used = []
    for setting in evidence.setting_names():
        arm = evidence.arm
        classification = setting != "dln"
        title = evidence.title(setting)
        standard = arm("standard", setting=setting)
        variants = [(a, n) for a, n in (("l1", "l1"), ("l2", "l2"), ("linf", "l-infinity"))]
        if not standard or not any(arm(a, setting=setting) for a, _ in variants):
            continue
        used.append(setting)
        quality: Reducer = final_test_accuracy if classification else _neg_log_loss
        quality_label = "final test accuracy" if classification else "-log10 final train loss"
        tolerance = ACCURACY_TOLERANCE if classification else math.log10(LOSS_FACTOR)
        bn_quality = per_seed(arm("bn", setting=setting), quality)
        std_range = smoothness(standard, "loss_range")
        std_shift = per_seed(standard, distribution_shift)
        for variant, name in variants:
            runs = arm(variant, setting=setting)
            if not runs:
                continue
            judged.part(
                f"{title}: {name} trains comparably to BN",
                at_least(per_seed(runs, quality), bn_quality, tolerance),
                (f"{name}, {quality_label}", per_seed(runs, quality)),
                (f"BN, {quality_label}", bn_quality),
                _where(evidence, setting),
            )
            loss_range = smoothness(runs, "loss_range")
            judged.part(
                f"{title}: {name} is smoother than standard",
                smaller(loss_range, std_range, SMOOTHNESS_MARGIN),
                (f"{name}, loss range along the gradient", loss_range),
                ("standard, loss range along the gradient", std_range),
                _where(evidence, setting),
            )
            shift = per_seed(runs, distribution_shift)
            judged.part(
                f"{title}: {name} shifts its distributions more than standard",
                better(shift, std_shift, SHIFT_MARGIN),
                (f"{name}, distribution shift", shift),
                ("standard, distribution shift", std_shift),
                _where(evidence, setting),
            )
    return _result(
        evidence,
        8,
        "The smoothing is not unique to BN: lp normalizations",
        "Normalizing by the average l1, l2 or l-infinity norm of the (un-centered) activations "
        "instead of the standard deviation trains comparably to BN and smooths the landscape, "
        "while the layer distributions shift more than in the standard network (section 3.3).",
        f"Per setting and variant: trains comparably (VGG/MLP: final test accuracy within "
        f"{ACCURACY_TOLERANCE:.0%} of BN's seed median; DLN: final training loss within a "
        f"factor {LOSS_FACTOR:g} of BN's); loss range along the gradient at least "
        f"{SMOOTHNESS_MARGIN:.0%} below the standard network's with separated seed ranges; "
        "distribution shift (as in claim 3) above the standard network's with separated seed "
        "ranges. Every part of every variant in every setting must hold. Which lp form the "
        "layers compute is in the protocol table.",
        (at_least, smaller, better),
        judged,
        used,
        ["lp_variants"],
    )


# --------------------------------------------------------------------------- claim 10


def bound_rule(ratios: Sequence[float]) -> Verdict:
    """Theorem 4.1 holds when every measured per-channel ||dL/dx_j|| / bound_j is <= 1 +
    BOUND_TOLERANCE; one violation (an infinite ratio included: a channel with a zero bound
    and a non-zero gradient) is enough for not reproduced; no measurement is inconclusive."""
    measured = [r for r in ratios if not math.isnan(r)]
    if not measured:
        return Verdict.INCONCLUSIVE
    if max(measured) <= 1.0 + BOUND_TOLERANCE:
        return Verdict.REPRODUCED
    return Verdict.NOT_REPRODUCED


def claim_10(evidence: StudyEvidence) -> ClaimResult:
    judged = Judged()
    used = []
    ratios: list[float] = []
    for setting in evidence.setting_names():
        runs = [
            r for r in evidence.arm("bn", setting=setting) if r.measurements.get("gradient_bound")
        ]
        if not runs:
            continue
        used.append(setting)
        layers: dict[str, dict[str, list[float]]] = {}
        for run in runs:
            for entry in run.measurements["gradient_bound"]["layers"]:
                per = layers.setdefault(entry["layer"], {"ratio": [], "lipschitz": [], "max": []})
                per["ratio"].append(float(entry["ratio"]))
                per["lipschitz"].append(float(entry["lipschitz_ratio"]))
                per["max"].append(float(entry["channel_ratio_max"]))
        title = evidence.title(setting)
        for layer, values in layers.items():
            judged.numbers[f"{title}, {layer}: ||dL/dx|| / bound"] = Spread.of(values["ratio"])
            judged.numbers[f"{title}, {layer}: Lipschitz ratio ||dL/dx|| / ||dL/dy||"] = Spread.of(
                values["lipschitz"]
            )
        here = [x for v in layers.values() for x in v["max"]]
        ratios += here
        worst = max(here, default=math.nan)
        name = f"{title}: every channel of every BN layer within the bound"
        judged.parts[name] = bound_rule(here)
        judged.notes.append(
            f"{name}: {judged.parts[name].value}; {len(layers)} BN layers x {len(runs)} seeds, "
            f"largest per-channel ratio {worst:.6g}."
        )
    judged.numbers["largest per-channel ratio, all layers, seeds and settings"] = max(
        ratios, default=math.nan
    )
    return _result(
        evidence,
        10,
        "Theorem 4.1 holds on the trained network",
        "For every BN layer and channel, the gradient with respect to the layer input is "
        "bounded by gamma^2 / sigma^2 times the output gradient with its projections on 1 and "
        "on x_hat removed (Santurkar et al., Theorem 4.1); the report also gives each layer's "
        "Lipschitz ratio ||dL/dx|| / ||dL/dy||.",
        "On the final weights of every BN seed, per layer and channel (every channel counts: "
        "one whose bound is <= 0 counts 0 when its input gradient is 0 and infinity "
        f"otherwise), the measured ||dL/dx_j|| over the bound; reproduced when all are <= 1 + "
        f"{BOUND_TOLERANCE:g} (float32 rounding), not reproduced on any violation.",
        (bound_rule,),
        judged,
        used,
        ["gradient_bound"],
    )


# --------------------------------------------------------------------------- claim 11


def converged_everywhere(runs: Sequence[Run]) -> bool:
    """Every top-eigenvalue probe of every run met its Lanczos tolerance."""
    flags = [
        v for r in runs for v in probe_series(r, "top_eigenvalues", "top_eigenvalue_converged")[1]
    ]
    return bool(flags) and all(f == 1.0 for f in flags)


def eigenvalue_rule(bn: Spread, standard: Spread, converged: bool) -> Verdict:
    """BN's parameter-space top eigenvalue smaller (``smaller``), but inconclusive whenever a
    Lanczos run behind either arm did not converge: such a number is no evidence."""
    if not converged:
        return Verdict.INCONCLUSIVE
    return smaller(bn, standard, SMOOTHNESS_MARGIN)


def claim_11(evidence: StudyEvidence) -> ClaimResult:
    judged = Judged()
    used = []
    for setting in evidence.setting_names():
        title = evidence.title(setting)
        bn_runs = evidence.arm("bn", setting=setting)
        std_runs = evidence.arm("standard", setting=setting)
        if not (bn_runs and std_runs):
            continue
        used.append(setting)
        layers = evidence.setting(setting).get("highlight_layers", [])
        reduce = layers_median("activation_curvature", "activation_curvature", layers)
        label = f"activation-space curvature g^T H g / ||g||^2 at {', '.join(layers)}"
        judged.part(
            f"{title}: BN lowers the {label} (Theorem 4.2)",
            smaller(per_seed(bn_runs, reduce), per_seed(std_runs, reduce), SMOOTHNESS_MARGIN),
            (f"BN, {label}", per_seed(bn_runs, reduce)),
            (f"standard, {label}", per_seed(std_runs, reduce)),
            _where(evidence, setting),
        )
        top = series_median("top_eigenvalues", "top_eigenvalue")
        converged = converged_everywhere(bn_runs + std_runs)
        name = f"{title}: BN lowers the parameter-space top Hessian eigenvalue"
        judged.part(
            name,
            eigenvalue_rule(per_seed(bn_runs, top), per_seed(std_runs, top), converged),
            ("BN, parameter-space top Hessian eigenvalue", per_seed(bn_runs, top)),
            ("standard, parameter-space top Hessian eigenvalue", per_seed(std_runs, top)),
            _where(evidence, setting),
        )
        if not converged:
            judged.notes.append(
                f"{name}: at least one Lanczos run did not converge (tolerance 1e-3 in 30 "
                "iterations), so this part is inconclusive whatever the numbers say."
            )
        along = series_median("curvature_along_gradient", "curvature")
        judged.numbers[f"{title} | BN, parameter-space curvature along the gradient"] = per_seed(
            bn_runs, along
        )
        judged.numbers[f"{title} | standard, parameter-space curvature along the gradient"] = (
            per_seed(std_runs, along)
        )
    return _result(
        evidence,
        11,
        "Curvature: along the activation gradient (Theorem 4.2) and the top eigenvalue",
        "Over training, the BN network's loss has lower curvature with respect to a layer's "
        "activations in the direction of their gradient (Theorem 4.2: g^T H g with g and H "
        "taken w.r.t. the layer output), and a smaller top eigenvalue of the parameter "
        "Hessian.",
        "Per seed, the median over probed steps (training-mode Hessians of the step's batch) "
        "of g^T H g / ||g||^2 w.r.t. the outputs of the highlighted layers, and of the top "
        "eigenvalue of the parameter Hessian (Lanczos); reproduced when BN's seed median is at "
        f"least {SMOOTHNESS_MARGIN:.0%} below the standard network's with separated seed "
        "ranges, for both quantities in every setting. A top eigenvalue whose Lanczos run did "
        "not converge makes its part inconclusive. The parameter-space curvature along the "
        "gradient is reported, not judged.",
        (smaller, converged_everywhere, eigenvalue_rule),
        judged,
        used,
        ["curvature", "spectral_density"],
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
