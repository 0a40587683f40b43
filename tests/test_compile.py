"""torch.compile(fullgraph=True) of models with bnlab norm layers: no graph break, and the
compiled training step and eval give the eager numbers (outputs, gradients, running buffers)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bnlab.nn as bnn
from helpers import rel_err

COMPILED_KINDS = ("bn", "noisy_bn", "l1", "linf", "ghost", "renorm", "layer", "group")


def _model(kinds: tuple[str, ...]) -> nn.Module:
    """Conv, then each kind's layer in turn (with a ReLU), then a Linear and a BatchNorm1d."""
    layers: list[nn.Module] = [nn.Conv2d(3, 8, 3, padding=1)]
    for kind in kinds:
        options = {"virtual_batch_size": 4} if kind == "ghost" else {}
        layers += [bnn.norm_layer(kind, 8, 2, **options), nn.ReLU()]
    layers += [nn.Flatten(), nn.Linear(8 * 4 * 4, 6), bnn.BatchNorm1d(6)]
    return nn.Sequential(*layers)


def _compare_training_and_eval(kinds: tuple[str, ...], backend: str = "inductor") -> None:
    torch.manual_seed(0)
    eager = _model(kinds)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)
    for step in range(2):  # twice: the running buffers (and num_batches_tracked) move twice
        x = torch.randn(16, 3, 4, 4) * (step + 1) + 0.5
        ya, yb = eager(x), compiled(x)
        assert rel_err(yb, ya) <= 1e-5
        ya.square().mean().backward()
        yb.square().mean().backward()
        for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters(), strict=True):
            assert rel_err(q.grad, p.grad) <= 1e-5, name
            p.grad = q.grad = None
    for (name, a), b in zip(eager.named_buffers(), compiled_model.buffers(), strict=True):
        assert rel_err(b, a) <= 1e-5, name
    eager.eval()
    compiled_model.eval()
    x = torch.randn(16, 3, 4, 4)
    assert rel_err(compiled(x), eager(x)) <= 1e-5


def test_compiled_model_with_every_kind_matches_eager_without_graph_breaks():
    """Dynamo and AOTAutograd (the operators' fake and autograd registrations, buffer
    mutation) over every kind; inductor's code generation is the next test's, for BatchNorm."""
    torch._dynamo.reset()
    _compare_training_and_eval(COMPILED_KINDS, backend="aot_eager")


@pytest.mark.slow
def test_inductor_compiled_batch_norm_and_variants_match_eager():
    torch._dynamo.reset()
    _compare_training_and_eval(("bn", "l1", "noisy_bn", "ghost"))


@pytest.mark.slow
def test_inductor_fuses_batch_norm_s_formulas_and_calls_the_variants_operator():
    """Inductor decomposes BatchNorm's operators into their formulas (it fuses them with the
    neighbouring ops); the variants' pair stays an operator call."""
    from torch._inductor import config
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    model = _model(("bn", "l1"))
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(16, 3, 4, 4)
    with config.patch(force_disable_caches=True):
        _, code = run_and_get_code(lambda: compiled(x).square().mean().backward())
    code = "\n".join(code)
    assert "torch.ops.bnlab.batch_norm" not in code  # no call ("Original ATen" notes may name it)
    assert "torch.ops.bnlab.norm_train.default(" in code


def test_compiled_batch_renorm_weight_gradients_match_eager():
    """r and d read the running buffers that the same step updates in place: AOTAutograd's
    min-cut partitioner recomputed them in the backward from the updated buffers (weight
    gradients 0.7-4% off) until they came from an operator, which is saved instead."""
    torch._dynamo.reset()
    _compare_training_and_eval(("renorm",), backend="aot_eager")


def test_compiled_noisy_batch_norm_matches_eager_without_graph_breaks():
    """The step's key is integer tensor arithmetic on the layer's buffers under compile (a
    torch.Generator cannot be traced) and Python ints in eager mode: the same noise."""
    torch._dynamo.reset()
    _compare_training_and_eval(("noisy_bn",), backend="eager")
