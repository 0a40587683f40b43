"""The study declaration: what runs, which probes, which claims."""

from __future__ import annotations

import pytest

from bnlab.studies import santurkar_study
from bnlab.train import run_names


def _runs(study):  # type: ignore[no-untyped-def]
    return {e.name: run_names(e.sweep) for e in study.experiments}


def test_full_study_declares_every_arm_grid_and_claim() -> None:
    study = santurkar_study("digits")
    manifest = study.to_dict()
    assert manifest["claims"] == list(range(1, 12))
    runs = _runs(study)
    norms = {c.model.norm for _, c in runs["landscape"]}
    assert norms == {"none", "bn", "noisy_bn", "l1", "l2", "linf"}
    assert all(c.probes for _, c in runs["landscape"])
    assert not any(c.probes for _, c in runs["learning_rate"] + runs["init_scale"])
    s = study.settings
    # the reference point is trained once, in the landscape experiment
    assert s.reference_lr not in {c.optim.lr for _, c in runs["learning_rate"]}
    assert 1.0 not in {c.model.init_scale for _, c in runs["init_scale"]}
    assert len(runs["learning_rate"]) == 2 * (len(s.learning_rates) - 1) * len(s.seeds)


def test_quick_study_is_smaller_and_seeds_override() -> None:
    full, quick = santurkar_study("digits"), santurkar_study("digits", quick=True)
    assert sum(map(len, _runs(quick).values())) < sum(map(len, _runs(full).values()))
    assert quick.settings.steps < full.settings.steps
    assert santurkar_study("digits", seeds=1).settings.seeds == (0,)
    with pytest.raises(ValueError, match="seeds"):
        santurkar_study("digits", seeds=0)


def test_feature_vector_data_get_an_mlp() -> None:
    study = santurkar_study("cancer", quick=True)
    assert study.experiments[0].sweep.base.model.name == "mlp"
