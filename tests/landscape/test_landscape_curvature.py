"""operator="ggn" | "fisher" | "empirical_fisher" against dense float64 truths and closed forms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnlab import landscape as L
from landscape.landscape_cases import bn_mlp, classification_batch, full_hessian, mlp

CE = nn.functional.cross_entropy
MSE = nn.functional.mse_loss


def _dense(model, loss_fn, batch, operator, **kwargs) -> torch.Tensor:
    """The operator's matrix, column by column from the probe's products with unit vectors."""
    dim = sum(p.numel() for p in model.parameters())
    eye = torch.eye(dim, dtype=torch.float64)
    cols = []
    for i in range(dim):
        hv = L.hvp(model, loss_fn, batch, eye[i], operator=operator, **kwargs)
        cols.append(torch.cat([t.reshape(-1) for t in hv.values()]))
    return torch.stack(cols, dim=1)


def _ggn_truth(model, loss_fn, batch) -> torch.Tensor:
    """J^T H_L J from torch.autograd.functional: J of all outputs, H_L of the loss in them."""
    params = dict(model.named_parameters())
    sizes = [p.numel() for p in params.values()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in params.values()])
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    def outputs_of(flat: torch.Tensor) -> torch.Tensor:
        parts = torch.split(flat, sizes)
        state = {n: t.reshape(p.shape) for (n, p), t in zip(params.items(), parts, strict=True)}
        state.update({n: b.clone() for n, b in buffers.items()})
        return torch.func.functional_call(model, state, (batch[0],))

    out = outputs_of(flat0)
    j = torch.autograd.functional.jacobian(outputs_of, flat0).reshape(out.numel(), -1)
    h_out = torch.autograd.functional.hessian(
        lambda o: loss_fn(o.reshape(out.shape), batch[1]), out.detach().reshape(-1)
    )
    return j.T @ h_out @ j


def _linear_softmax(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Linear(4, 3).double()
    return model, classification_batch(n=20)


def _jacobians(x: torch.Tensor, classes: int) -> list[torch.Tensor]:
    """J_n of o_n = W x_n + b w.r.t. (W flattened row-major, b): [I_C kron x_n^T, I_C]."""
    eye = torch.eye(classes, dtype=torch.float64)
    return [torch.cat([torch.kron(eye, xn.unsqueeze(0)), eye], dim=1) for xn in x]


def test_least_squares_ggn_equals_the_hessian():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x, _ = classification_batch()
    target = torch.randn(x.shape[0], 3, dtype=torch.float64)
    ggn = _dense(model, MSE, (x, target), "ggn")
    hessian = full_hessian(model, MSE, (x, target))
    torch.testing.assert_close(ggn, hessian, rtol=1e-12, atol=1e-12)
    # closed form: 2/(N C) [X 1]^T [X 1] kron I ... in (W, b) order
    jac = torch.cat(_jacobians(x, 3))
    torch.testing.assert_close(ggn, 2 * jac.T @ jac / target.numel(), rtol=1e-12, atol=1e-12)


def test_linear_softmax_ggn_has_its_closed_form():
    model, (x, y) = _linear_softmax()
    with torch.no_grad():
        p = torch.softmax(model(x), dim=1)
    closed = sum(
        j.T @ (torch.diag(pn) - torch.outer(pn, pn)) @ j
        for j, pn in zip(_jacobians(x, 3), p, strict=True)
    ) / len(x)
    torch.testing.assert_close(_dense(model, CE, (x, y), "ggn"), closed, rtol=1e-10, atol=1e-12)
    # a linear model's GGN is its Hessian
    torch.testing.assert_close(full_hessian(model, CE, (x, y)), closed, rtol=1e-10, atol=1e-12)


def test_empirical_fisher_of_linear_softmax_has_its_closed_form():
    model, (x, y) = _linear_softmax()
    with torch.no_grad():
        r = torch.softmax(model(x), dim=1) - nn.functional.one_hot(y, 3).double()
    closed = sum(
        j.T @ torch.outer(rn, rn) @ j for j, rn in zip(_jacobians(x, 3), r, strict=True)
    ) / len(x)
    got = _dense(model, CE, (x, y), "empirical_fisher")
    torch.testing.assert_close(got, closed, rtol=1e-10, atol=1e-12)


def test_monte_carlo_fisher_converges_to_the_ggn_for_cross_entropy():
    # E_{y ~ softmax}[r r^T] = diag(p) - p p^T, so the Fisher of a categorical likelihood is the
    # GGN; with S labels per input the estimate's error shrinks like 1/sqrt(S).
    model, batch = _linear_softmax()
    ggn = _dense(model, CE, batch, "ggn")
    errors = []
    for samples in (10, 1000):
        fisher = _dense(model, CE, batch, "fisher", mc_samples=samples)
        torch.testing.assert_close(fisher, fisher.T)
        assert float(torch.linalg.eigvalsh(fisher)[0]) > -1e-12
        errors.append(float(torch.linalg.norm(fisher - ggn) / torch.linalg.norm(ggn)))
    assert errors[1] < 0.06
    assert errors[1] < errors[0] / 3


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_ggn_of_networks_matches_the_dense_jacobian_product(mode):
    for model in (mlp(), bn_mlp()):
        batch = classification_batch()
        model.train(mode == "train")
        truth = _ggn_truth(model, CE, batch)
        got = _dense(model, CE, batch, "ggn", mode=mode)
        torch.testing.assert_close(got, truth, rtol=1e-9, atol=1e-12)


def test_eigenvalues_trace_and_density_take_the_operator():
    model = mlp()
    batch = classification_batch()
    truth = _ggn_truth(model, CE, batch)
    spectrum = torch.linalg.eigvalsh(truth)
    top = L.top_eigenvalues(model, CE, batch, k=3, tol=1e-9, operator="ggn")
    assert top.operator == "ggn"
    torch.testing.assert_close(
        torch.tensor(top.eigenvalues, dtype=torch.float64), spectrum.flip(0)[:3], rtol=1e-7, atol=0
    )
    hessian_top = L.top_eigenvalues(model, CE, batch, k=1, tol=1e-9).eigenvalues[0]
    assert abs(hessian_top - top.eigenvalues[0]) > 1e-3  # a different matrix, not the Hessian
    trace = L.hutchinson_trace(model, CE, batch, samples=400, operator="ggn")
    assert abs(trace.trace - float(truth.trace())) < 4 * trace.standard_error
    density = L.spectral_density(model, CE, batch, iterations=truth.shape[0], operator="ggn")
    assert max(density.nodes[0]) == pytest.approx(float(spectrum[-1]), rel=1e-8)
    sharp = L.sharpness(model, CE, batch, tol=1e-9, operator="ggn")
    assert sharp.sharpness == pytest.approx(float(spectrum[-1]), rel=1e-8)


def test_bad_operator_arguments_are_refused():
    model, batch = _linear_softmax()
    with pytest.raises(ValueError, match="operator must be one of"):
        L.top_eigenvalues(model, CE, batch, operator="gauss")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match='applies to operator="hessian" only'):
        L.hutchinson_trace(model, CE, batch, operator="ggn", method="forward")
    with pytest.raises(ValueError, match="mc_samples must be a positive"):
        L.top_eigenvalues(model, CE, batch, operator="fisher", mc_samples=0)
    target = torch.randn(20, 3, 2, dtype=torch.float64)
    seq = nn.Sequential(nn.Linear(4, 6), nn.Unflatten(1, (3, 2))).double()
    with pytest.raises(ValueError, match=r"needs \(batch, classes\) logits"):
        L.top_eigenvalues(seq, MSE, (batch[0], target), operator="fisher")
