"""The registry of normalization kinds (bnlab.nn.VARIANTS): each description is what its
layers do."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import bnlab.nn as bnn
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
