"""Every probe leaves the model exactly as found, and sees one function per call."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bnlab.nn as bnn
from bnlab import landscape as L
from landscape.landscape_cases import classification_batch

CE = nn.functional.cross_entropy


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 8),
        bnn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(8, 8),
        bnn.NoisyBatchNorm1d(8, seed=7),
        nn.Tanh(),
        nn.Linear(8, 3),
    ).double()


def _prepared():
    """A model mid-training: moved running stats, some .grad set, mixed training flags."""
    model = _model()
    batch = classification_batch()
    model.train()
    CE(model(batch[0]), batch[1]).backward()
    model[7].weight.grad = None
    model[3].eval()  # a flag the probe must put back
    return model, batch


def _snapshot(model: nn.Module):
    assert isinstance(model[5], bnn.NoisyBatchNorm1d)  # its step counter is in the state
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)},
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "grad_ids": [id(p.grad) for p in model.parameters()],
        "flags": [m.training for m in model.modules()],
        "rng": torch.get_rng_state(),
    }


def _assert_same(before, after):
    assert before["state"].keys() == after["state"].keys()
    for key in before["state"]:
        assert torch.equal(before["state"][key], after["state"][key]), key
    for a, b in zip(before["params"], after["params"], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(before["grads"], after["grads"], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    assert before["grad_ids"] == after["grad_ids"]
    assert before["flags"] == after["flags"]
    assert torch.equal(before["rng"], after["rng"])


PROBES = {
    "gradient_path": lambda m, b: L.gradient_path(m, CE, b),
    "gradient_path_eval": lambda m, b: L.gradient_path(m, CE, b, mode="eval"),
    "ics": lambda m, b: L.internal_covariate_shift(
        m, CE, b, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    ),
    "hvp": lambda m, b: L.hvp(m, CE, b, {n: torch.ones_like(p) for n, p in m.named_parameters()}),
    "hvp_forward": lambda m, b: L.hvp(
        m, CE, b, {n: torch.ones_like(p) for n, p in m.named_parameters()}, method="forward"
    ),
    "top_eigenvalues": lambda m, b: L.top_eigenvalues(m, CE, b, k=2, max_iterations=10),
    "hutchinson": lambda m, b: L.hutchinson_trace(m, CE, b, samples=3, groups="layer"),
    "density": lambda m, b: L.spectral_density(m, CE, b, iterations=5),
    "curvature": lambda m, b: L.curvature_along_gradient(m, CE, b, groups="block"),
    "sharpness": lambda m, b: L.sharpness(m, CE, b, max_iterations=5),
    "sharpness_warm": lambda m, b: L.sharpness(
        m, CE, b, max_iterations=5, previous=L.sharpness(m, CE, b, max_iterations=3)
    ),
    "ggn_eigenvalues": lambda m, b: L.top_eigenvalues(m, CE, b, max_iterations=5, operator="ggn"),
    "fisher_trace": lambda m, b: L.hutchinson_trace(m, CE, b, samples=3, operator="fisher"),
    "empirical_fisher_density": lambda m, b: L.spectral_density(
        m, CE, b, iterations=4, operator="empirical_fisher"
    ),
    "effective_lr": lambda m, b: L.effective_learning_rates(
        m, CE, b, lr=0.1, previous={n: p.detach() + 1 for n, p in m.named_parameters()}
    ),
    "bound": lambda m, b: L.gradient_bound(m, CE, b),
    "surface": lambda m, b: L.loss_surface(m, CE, b, [-0.5, 0.5], [0.0, 1.0]),
}


@pytest.mark.parametrize("probe", list(PROBES))
def test_probe_leaves_model_grads_buffers_flags_and_rng_bit_for_bit(probe):
    model, batch = _prepared()
    before = _snapshot(model)
    PROBES[probe](model, batch)
    _assert_same(before, _snapshot(model))


def test_probe_on_a_loader_leaves_the_model_as_found():
    model, batch = _prepared()
    loader = [(batch[0][:12], batch[1][:12]), (batch[0][12:], batch[1][12:])]
    before = _snapshot(model)
    L.top_eigenvalues(model, CE, loader, k=1, max_iterations=5)
    L.gradient_path(model, CE, loader)
    _assert_same(before, _snapshot(model))


def test_a_probe_is_a_function_of_the_model_and_the_rng_state():
    model, batch = _prepared()
    first = L.gradient_path(model, CE, batch)
    second = L.gradient_path(model, CE, batch)
    assert first.to_dict() == second.to_dict()


def test_noise_and_dropout_are_fixed_within_one_probe():
    # Over two batches the gradient graph is rebuilt for every product, so a Hessian that is
    # symmetric (u^T H v = v^T H u) shows every evaluation saw the same noise and dropout masks.
    model, batch = _prepared()
    loader = [(batch[0][:12], batch[1][:12]), (batch[0][12:], batch[1][12:])]
    gen = torch.Generator().manual_seed(0)
    u = {n: torch.randn(p.shape, dtype=p.dtype, generator=gen) for n, p in model.named_parameters()}
    v = {n: torch.randn(p.shape, dtype=p.dtype, generator=gen) for n, p in model.named_parameters()}
    eig = L.top_eigenvalues(model, CE, loader, k=1, tol=1e-9)
    assert eig.converged
    from bnlab.landscape.evaluation import Objective, leave_as_found

    with leave_as_found(model):
        objective = Objective(model, CE, loader)
        hu, hv = objective.hvp(u), objective.hvp(v)
        loss_a, loss_b = objective.loss(), objective.loss()
    u_hv = sum(float((u[n] * hv[n]).sum()) for n in u)
    v_hu = sum(float((v[n] * hu[n]).sum()) for n in u)
    assert u_hv == pytest.approx(v_hu, rel=1e-10)
    assert loss_a == loss_b


def test_train_mode_uses_batch_statistics_and_eval_mode_running_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), bnn.BatchNorm1d(6), nn.Linear(6, 3)).double()
    batch = classification_batch()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        eval_loss = float(CE(reference.eval()(batch[0]), batch[1]))
        train_loss = float(CE(reference.train()(batch[0]), batch[1]))
    assert eval_loss != pytest.approx(train_loss)
    model.eval()
    assert L.gradient_path(model, CE, batch).loss == pytest.approx(train_loss, rel=1e-14)
    model.train()
    assert L.gradient_path(model, CE, batch, mode="eval").loss == pytest.approx(
        eval_loss, rel=1e-14
    )


def test_batch_renorm_sees_the_same_running_statistics_at_every_point():
    # Batch Renormalization's output depends on its running stats: were they updated between
    # evaluations, two evaluations at the same point would differ.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 6), bnn.BatchRenorm1d(6, r_max=1.5, d_max=0.5), nn.Linear(6, 3)
    )
    model = model.double()
    batch = classification_batch()
    result = L.gradient_path(model, CE, batch, etas=[0.1, 0.1])
    assert result.losses[0] == result.losses[1]
    assert result.gradient_differences[0] == result.gradient_differences[1]
