"""The registry of normalization kinds (bnlab.nn.VARIANTS): each description is what its
layers do."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import bnlab.nn as bnn
from bnlab.bench.layers import benchmarked_kinds, make_layer
from bnlab.models import build_model
from bnlab.report import figures
from bnlab.studies import santurkar_study
from bnlab.studies.santurkar import ARMS
from bnlab.train import config_from_dict
from helpers import rel_err

KINDS = [k for k in bnn.NORM_KINDS if k != "none"]
SHAPES = {0: (6, 3, 2, 2), 1: (6, 3), 2: (6, 3, 4, 4), 3: (6, 3, 2, 2, 2)}


def test_every_kind_has_its_own_label_and_colour():
    assert len(set(bnn.labels().values())) == len(bnn.NORM_KINDS)
    assert len(set(bnn.colors().values())) == len(bnn.NORM_KINDS)
    assert all(c.startswith("#") and len(c) == 7 for c in bnn.colors().values())
    assert list(bnn.labels()) == list(bnn.NORM_KINDS) == list(bnn.VARIANTS)


@pytest.mark.parametrize("rank", [0, 1, 2, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_norm_layer_builds_the_declared_class_for_each_rank(kind, rank):
    description = bnn.variant(kind)
    layer = bnn.norm_layer(kind, 3, rank)
    assert type(layer) is description.classes[rank]
    assert bnn.is_norm_layer(layer)
    for option, value in description.options.items():
        assert getattr(layer, option) == value
    x = torch.randn(SHAPES[rank]) * 2 + 1
    assert layer(x).shape == x.shape
    stats = description.statistics
    has_running = hasattr(layer, "running_mean") and layer.running_mean is not None
    assert has_running == (stats.over == "batch")
    assert getattr(layer, "p", 2.0) == stats.p
    if stats.over == "batch":
        assert layer._scale_buffer == stats.running
        assert getattr(layer, stats.running) is not None


@pytest.mark.parametrize("kind", [k for k in KINDS if k in ("bn", "l1", "l2", "linf")])
def test_the_declared_reference_defines_the_training_output(kind):
    description = bnn.variant(kind)
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, size=(8, 3, 4, 4))
    gamma, beta = rng.uniform(0.5, 2, size=3), rng.normal(size=3)
    layer = bnn.norm_layer(kind, 3, 2, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(gamma))
        layer.bias.copy_(torch.from_numpy(beta))
    y_ref, _ = description.reference(x, gamma, beta, layer.eps, **description.options)
    assert rel_err(layer(torch.from_numpy(x)), y_ref) <= 1e-10


def test_none_is_the_identity_and_unknown_kinds_are_refused_by_name():
    assert isinstance(bnn.norm_layer("none", 3), nn.Identity)
    with pytest.raises(ValueError, match="unknown norm kind 'batch'; known kinds: none, bn, "):
        bnn.variant("batch")
    with pytest.raises(ValueError, match=r"rank must be 0 .* got 4"):
        bnn.norm_layer("bn", 3, 4)


class HalvedBatchNorm(bnn.BatchNorm):
    """A throwaway kind for the test below: BatchNorm's output halved (a module of its own,
    as a new variant would be)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return 0.5 * super().forward(input)


@pytest.fixture
def halved_kind():
    """The kind "halved", registered as a paper arm of the study for one test, then removed."""
    kind = bnn.register(
        bnn.NormKind(
            "halved",
            (HalvedBatchNorm,) * 4,
            bnn.Statistics("batch"),
            "Halved BatchNorm",
            "#000001",
            arm=bnn.Arm("halved", "paper"),
        )
    )
    yield kind
    bnn.unregister("halved")
    assert "halved" not in bnn.NORM_KINDS


def test_a_registered_kind_reaches_every_reader_without_edits(halved_kind):
    """Adding a variant is its module plus one registry entry: models, convert_norm, the
    training configs, the study's arms, the figures and the layer benchmark all read it (each
    imported at the top of this file, before the kind exists)."""
    assert bnn.NORM_KINDS[-1] == "halved" and "halved" in bnn.NORM_KINDS
    assert bnn.labels()["halved"] == "Halved BatchNorm"
    model = build_model("mlp", (10,), 3, norm="halved", seed=0)
    layers = [m for m in model.modules() if bnn.is_norm_layer(m)]
    assert layers and all(type(m) is HalvedBatchNorm for m in layers)
    converted = bnn.convert_norm(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), "halved")
    assert type(converted[1]) is HalvedBatchNorm
    x = torch.randn(8, 3)
    reference = nn.BatchNorm1d(3)
    torch.testing.assert_close(converted[1](x), 0.5 * reference(x))
    config = config_from_dict({"model": {"name": "mlp", "norm": "halved"}})
    assert config.model.norm == "halved"
    assert ARMS["halved"] == "halved"
    study = santurkar_study("digits", quick=True, dln=False)
    assert study.arms["halved"] == "halved"
    assert "halved" in study.experiment("landscape_variants").sweep.grid["model.norm"]
    assert figures._label("halved") == "Halved BatchNorm"
    assert figures._color("halved") == "#000001"
    assert figures._label("standard") == "Standard"  # an arm named apart from its kind
    assert "halved" in benchmarked_kinds()
    assert type(make_layer("halved", 3, 4)) is HalvedBatchNorm


def test_a_kind_taking_a_known_name_label_or_colour_is_refused():
    bn = bnn.variant("bn")
    with pytest.raises(ValueError, match="name 'bn' is 'bn'"):
        bnn.register(bn)
    with pytest.raises(ValueError, match="colour '#d62728' is 'bn'"):
        bnn.register(bnn.NormKind("bn2", bn.classes, bn.statistics, "BN again", bn.color))
    assert "bn2" not in bnn.NORM_KINDS
