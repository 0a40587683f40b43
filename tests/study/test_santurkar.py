"""The study declaration: what runs, which probes, which claims, the paper's two settings."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bnlab.studies import santurkar_study
from bnlab.studies.santurkar import DLN_LOSS_SCALE, highlighted
from bnlab.train import run_names


def _runs(study):  # type: ignore[no-untyped-def]
    return {e.name: run_names(e.sweep) for e in study.experiments}


def test_full_study_declares_every_arm_grid_and_claim() -> None:
    study = santurkar_study("digits")
    manifest = study.to_dict()
    assert manifest["claims"] == list(range(1, 12))
    runs = _runs(study)
    paper = {"none", "bn", "noisy_bn", "l1", "l2", "linf"}
    # LayerNorm and GroupNorm, past the paper: in the VGG setting only, beside the paper's arms
    assert manifest["extension_arms"] == {"layer": "layer", "group": "group"}
    for landscape, extension in (("landscape", {"layer", "group"}), ("dln", set())):
        norms = {c.model.norm for _, c in runs[landscape] + runs[f"{landscape}_variants"]}
        assert norms == paper | extension
        # ICS and the Hessian probes where claims 4 and 11 read them: standard and BN
        for _, config in runs[landscape]:
            assert config.model.norm in ("none", "bn")
            assert {p.name for p in config.probes} >= {
                "gradient_path",
                "internal_covariate_shift",
                "top_eigenvalues",
                "activation_curvature",
                "activation_distribution",
            }
        # the other arms: what claims 3 and 8 read, the gradient path and the activations
        for _, config in runs[f"{landscape}_variants"]:
            assert {p.name for p in config.probes} == {"gradient_path", "activation_distribution"}
    assert not any(c.probes for _, c in runs["init_scale"])
    s = study.settings
    # the reference point is trained once, in the landscape experiment
    assert s.reference_lr not in {c.optim.lr for _, c in runs["learning_rate"]}
    assert 1.0 not in {c.model.init_scale for _, c in runs["init_scale"]}
    assert len(runs["learning_rate"]) == 2 * (len(s.learning_rates) - 1) * len(s.seeds)
    assert {e["setting"] for e in manifest["experiments"]} == {"vgg", "dln"}


def test_vgg_setting_is_the_papers_optimizer_init_batch_and_layers() -> None:
    study = santurkar_study("digits")
    _, config = run_names(study.experiment("landscape").sweep)[0]
    assert config.model.name == "vgg10_digits" and config.model.options["init"] == "glorot"
    assert (config.optim.name, config.optim.momentum, config.optim.weight_decay) == ("SGD", 0, 0)
    assert config.optim.lr == 0.1 and config.data.batch_size == 128
    probes = {p.name: p for p in config.probes}
    assert probes["gradient_path"].options["etas"][0] == 0.5
    assert probes["gradient_path"].options["etas"][-1] == 4.0
    # the paper's layers 5 and 10: the 5th and 10th convolutions
    assert probes["internal_covariate_shift"].options["layers"] == ["features.13", "features.29"]
    assert [slot for _, slot in highlighted(study.settings)] == ["features.14", "features.30"]
    assert 0.01 in study.settings.learning_rates and 0.5 in study.settings.learning_rates


def test_dln_setting_is_full_batch_gd_at_the_papers_rate_on_the_summed_loss() -> None:
    study = santurkar_study("digits")
    _, config = run_names(study.experiment("dln").sweep)[0]
    assert config.model.name == "dln" and config.model.options == {
        "depth": 25,
        "width": 10,
        "init": "glorot",
    }
    assert config.data.spec == "gaussian" and config.data.batch_size == 1000
    # 1,250 samples, a 20% test split: 1,000 training samples = one batch (full-batch GD)
    assert round(config.data.options["n_samples"] * (1 - config.data.test_fraction)) == 1000
    # lr 1e-6 on the summed loss = 1e-6 * N d on torch's mean squared error
    assert config.optim.lr == pytest.approx(1e-6 * DLN_LOSS_SCALE)
    assert DLN_LOSS_SCALE == 1000 * 10
    probes = {p.name: p for p in config.probes}
    assert probes["gradient_path"].options["etas"][0] == 0.01
    assert probes["gradient_path"].options["etas"][-1] == 30.0
    assert probes["internal_covariate_shift"].options == {}  # every layer
    assert probes["activation_curvature"].options["layers"] == ["layers.17", "layers.33"]
    rates = {c.optim.lr for _, c in run_names(study.experiment("dln_learning_rate").sweep)}
    assert len(rates) == 1 and rates.pop() == pytest.approx(1e-7 * DLN_LOSS_SCALE)


def test_protocol_table_names_every_deviation_with_a_reason() -> None:
    rows = santurkar_study("digits").protocol_rows
    by_name = {row[0]: row for row in rows}
    assert by_name["VGG: steps"][1] == "15,000" and by_name["VGG: steps"][3]
    assert by_name["DLN: steps"][1] == "10,000" and by_name["DLN: steps"][3]
    assert by_name["VGG: optimizer"][3] == ""
    assert {"noisy BN: noise", "lp BN: scale", "DLN: loss"} <= set(by_name)
    for parameter, paper, ours, _ in rows:
        assert parameter and paper and ours


def test_quick_study_is_smaller_and_seeds_override() -> None:
    full, quick = santurkar_study("digits"), santurkar_study("digits", quick=True)
    assert sum(map(len, _runs(quick).values())) < sum(map(len, _runs(full).values()))
    assert quick.settings.steps < full.settings.steps
    assert quick.dln is not None and full.dln is not None and quick.dln.steps < full.dln.steps
    assert santurkar_study("digits", seeds=1).settings.seeds == (0,)
    with pytest.raises(ValueError, match="seeds"):
        santurkar_study("digits", seeds=0)


def test_paper_protocol_needs_cifar10_and_is_the_papers_length() -> None:
    with pytest.raises(ValueError, match="needs --data cifar10:PATH"):
        santurkar_study("digits", protocol="paper")
    with pytest.raises(ValueError, match="--protocol 'fast'"):
        santurkar_study("digits", protocol="fast")
    study = santurkar_study("cifar10:/nonexistent", protocol="paper")
    assert study.settings.model == "vgg16" and study.settings.steps == 15_000
    assert study.dln is not None and study.dln.steps == 10_000


def test_feature_vector_data_get_an_mlp() -> None:
    study = santurkar_study("cancer", quick=True)
    assert study.experiments[0].sweep.base.model.name == "mlp"


def test_time_estimate_counts_every_run_and_step(monkeypatch: pytest.MonkeyPatch) -> None:
    from bnlab.studies import estimate

    study = santurkar_study("digits", quick=True, seeds=1)
    assert estimate.step_seconds(study.experiments[0].sweep.base) > 0  # a real timed step
    monkeypatch.setattr(estimate, "step_seconds", lambda config: 0.01)
    seconds, runs, steps = estimate.estimate_seconds(study, jobs=2)
    configs = [c for e in study.experiments for _, c in run_names(e.sweep)]
    assert runs == len(configs) and steps == sum(c.steps for c in configs)
    probed = sum(
        c.steps for e in study.experiments if e.sweep.base.probes for _, c in run_names(e.sweep)
    )
    expected = 0.01 * (steps + estimate.PROBE_OVERHEAD * probed) / 2
    assert seconds == pytest.approx(expected)


@pytest.fixture
def wide_kind():
    """A kind registered as an extension arm for one test, then removed."""
    from bnlab import nn as bnn

    kind = bnn.register(
        bnn.NormKind(
            "wide_group",
            (bnn.GroupNorm,) * 4,
            bnn.Statistics("sample", running=None),
            "Wide GroupNorm",
            "#000002",
            arm=bnn.Arm("wide", "extension"),
        )
    )
    yield kind
    bnn.unregister("wide_group")


def test_a_registered_extension_arm_trains_at_the_other_arms_settings(wide_kind) -> None:
    from bnlab.studies.santurkar import ARMS

    study = santurkar_study("digits", quick=True)
    assert study.extension_arms["wide"] == "wide_group" and "wide" not in ARMS
    assert study.to_dict()["extension_arms"]["wide"] == "wide_group"
    runs = _runs(study)
    assert "wide_group" not in {c.model.norm for _, c in runs["dln_variants"]}
    configs = {(c.model.norm, c.seed): c for _, c in runs["landscape_variants"]}
    # every setting of the lp arm's runs, the norm kind aside: steps, rate, seeds, probes
    for seed in study.settings.seeds:
        wide, l1 = configs[("wide_group", seed)], configs[("l1", seed)]
        assert replace(wide, model=replace(wide.model, norm="l1")) == l1
