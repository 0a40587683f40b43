"""Hessian probes against closed forms and ``torch.autograd.functional.hessian`` (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bnlab import landscape as L
from landscape.landscape_cases import (
    Quadratic,
    bn_mlp,
    classification_batch,
    flat_grad,
    full_hessian,
    mlp,
    quadratic_loss,
    spd_with_spectrum,
)

CE = nn.functional.cross_entropy


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def _top(h: torch.Tensor, k: int) -> list[float]:
    return sorted(torch.linalg.eigvalsh(h).tolist(), reverse=True)[:k]


def _quadratic_case():
    torch.manual_seed(0)
    model = Quadratic((5, 7))
    spectrum = [9.0, 5.0, 4.5, 3.0, 2.0, 1.5, 1.0, 0.5, 0.25, 0.1, -0.2, -1.0]
    a = spd_with_spectrum(spectrum)
    c = torch.randn(12, dtype=torch.float64)
    batch = (torch.zeros(1, 1, dtype=torch.float64), c.unsqueeze(0))
    return model, quadratic_loss(a), batch, a


def test_top_eigenvalues_of_a_quadratic_match_its_chosen_spectrum():
    model, loss, batch, a = _quadratic_case()
    result = L.top_eigenvalues(model, loss, batch, k=3, tol=1e-10)
    assert result.converged
    for got, want in zip(result.eigenvalues, [9.0, 5.0, 4.5], strict=True):
        assert _rel(got, want) < 1e-6
    assert result.hvp_count == result.iterations <= 12
    # eigenvectors are unit eigenvectors of A
    for value, vector in zip(result.eigenvalues, result.eigenvectors, strict=True):
        u = torch.cat([vector["parts.0"], vector["parts.1"]])
        assert torch.allclose(a @ u, value * u, atol=1e-8)
        assert math.isclose(float(u.norm()), 1.0, rel_tol=1e-10)


def test_smallest_eigenvalues_are_found_with_which_smallest():
    model, loss, batch, _ = _quadratic_case()
    result = L.top_eigenvalues(model, loss, batch, k=2, tol=1e-10, which="smallest")
    assert _rel(result.eigenvalues[0], -1.0) < 1e-6
    assert _rel(result.eigenvalues[1], -0.2) < 1e-6


def test_per_group_eigenvalues_are_those_of_the_diagonal_blocks():
    model, loss, batch, a = _quadratic_case()
    result = L.top_eigenvalues(
        model, loss, batch, k=2, tol=1e-10, groups={"first": ["parts.0"], "second": ["parts.1"]}
    )
    assert set(result) == {"first", "second"}
    for got, want in zip(result["first"].eigenvalues, _top(a[:5, :5], 2), strict=True):
        assert _rel(got, want) < 1e-6
    for got, want in zip(result["second"].eigenvalues, _top(a[5:, 5:], 2), strict=True):
        assert _rel(got, want) < 1e-6
    assert result["first"].dimension == 5


def test_network_eigenvalues_whole_and_per_layer_match_the_full_hessian():
    model = mlp()
    batch = classification_batch()
    h = full_hessian(model, CE, batch)
    result = L.top_eigenvalues(model, CE, batch, k=3, tol=1e-10)
    for got, want in zip(result.eigenvalues, _top(h, 3), strict=True):
        assert _rel(got, want) < 1e-6
    per_layer = L.top_eigenvalues(model, CE, batch, k=2, tol=1e-10, groups="layer")
    assert list(per_layer) == ["0", "2"]
    for group, names in {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias"]}.items():
        block = full_hessian(model, CE, batch, names)
        for got, want in zip(per_layer[group].eigenvalues, _top(block, 2), strict=True):
            assert _rel(got, want) < 1e-6


def test_linear_regression_hessian_is_twice_the_covariance():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 5, dtype=torch.float64, generator=gen)
    y = torch.randn(40, 1, dtype=torch.float64, generator=gen)
    model = nn.Linear(5, 1).double()
    mse = nn.functional.mse_loss
    design = torch.cat([x, torch.ones(40, 1, dtype=torch.float64)], dim=1)
    h = 2 * design.T @ design / 40  # parameters (weight, bias) in that order
    result = L.top_eigenvalues(model, mse, (x, y), k=6, tol=1e-10)
    for got, want in zip(result.eigenvalues, _top(h, 6), strict=True):
        assert _rel(got, want) < 1e-6
    trace = L.hutchinson_trace(model, mse, (x, y), samples=300, seed=1)
    assert abs(trace.trace - float(torch.trace(h))) < 4 * trace.standard_error


def test_logistic_regression_hessian_is_the_weighted_covariance():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(50, 4, dtype=torch.float64, generator=gen)
    y = (torch.rand(50, 1, generator=gen, dtype=torch.float64) > 0.5).double()
    torch.manual_seed(0)
    model = nn.Linear(4, 1).double()
    bce = nn.functional.binary_cross_entropy_with_logits
    design = torch.cat([x, torch.ones(50, 1, dtype=torch.float64)], dim=1)
    with torch.no_grad():
        p = torch.sigmoid(model(x)).squeeze(1)
    h = design.T @ (design * (p * (1 - p)).unsqueeze(1)) / 50
    result = L.top_eigenvalues(model, bce, (x, y), k=2, tol=1e-10)
    for got, want in zip(result.eigenvalues, _top(h, 2), strict=True):
        assert _rel(got, want) < 1e-6
    g = flat_grad(model, bce, (x, y))
    curvature = L.curvature_along_gradient(model, bce, (x, y))
    assert _rel(curvature.curvature, float(g @ h @ g / (g @ g))) < 1e-10


def test_hutchinson_is_exact_for_rademacher_on_a_diagonal_hessian():
    torch.manual_seed(0)
    model = Quadratic((6,))
    a = torch.diag(torch.tensor([3.0, 1.0, -2.0, 0.5, 7.0, 0.25], dtype=torch.float64))
    batch = (torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, 6, dtype=torch.float64))
    result = L.hutchinson_trace(model, quadratic_loss(a), batch, samples=5)
    assert result.trace == pytest.approx(float(torch.trace(a)), rel=1e-14)
    assert result.standard_error < 1e-14
    gaussian = L.hutchinson_trace(
        model, quadratic_loss(a), batch, samples=5, distribution="gaussian"
    )
    assert gaussian.standard_error > 0.1  # a Gaussian probe is not exact: the test above can fail


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_trace_is_within_its_standard_error_of_the_exact_trace(distribution):
    model = mlp()
    batch = classification_batch()
    h = full_hessian(model, CE, batch)
    result = L.hutchinson_trace(
        model, CE, batch, samples=400, distribution=distribution, groups="layer", seed=2
    )
    exact = float(torch.trace(h))
    assert result.samples == result.hvp_count == 400
    # meaningful: the error bar is small next to the trace itself
    assert result.standard_error < 0.1 * abs(exact)
    assert abs(result.trace - exact) < 4 * result.standard_error
    n0 = 4 * 6 + 6
    blocks = {"0": float(torch.trace(h[:n0, :n0])), "2": float(torch.trace(h[n0:, n0:]))}
    for group, want in blocks.items():
        got, error = result.group_traces[group], result.group_standard_errors[group]
        assert abs(got - want) < 4 * error


def test_hutchinson_tol_stops_early_when_the_error_is_small():
    model, loss, batch, _a = _quadratic_case()
    result = L.hutchinson_trace(model, loss, batch, samples=1000, tol=0.05)
    assert 10 <= result.samples < 1000
    assert result.standard_error <= 0.05 * abs(result.trace)


def test_curvature_along_gradient_matches_g_h_g_whole_and_per_group():
    model = mlp()
    batch = classification_batch()
    h = full_hessian(model, CE, batch)
    g = flat_grad(model, CE, batch)
    result = L.curvature_along_gradient(model, CE, batch)
    assert _rel(result.curvature, float(g @ h @ g / (g @ g))) < 1e-10
    assert _rel(result.gradient_norm, float(g.norm())) < 1e-12
    per_block = L.curvature_along_gradient(model, CE, batch, groups="block")
    n0 = 30
    g0, h0 = g[:n0], h[:n0, :n0]
    assert _rel(per_block["0"].curvature, float(g0 @ h0 @ g0 / (g0 @ g0))) < 1e-10


@pytest.mark.parametrize("method", ["reverse", "forward"])
@pytest.mark.parametrize("make", [mlp, bn_mlp], ids=["mlp", "bn_mlp"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_hvp_equals_the_full_hessian_times_v_and_finite_differences(method, make, mode):
    model = make()
    model.train(mode == "train")
    batch = classification_batch()
    h = full_hessian(model, CE, batch)
    model.train()  # the probe's mode, not the model's flag, decides
    gen = torch.Generator().manual_seed(5)
    v = torch.randn(h.shape[0], dtype=torch.float64, generator=gen)
    hv = L.hvp(model, CE, batch, v, method=method, mode=mode)
    flat_hv = torch.cat([t.reshape(-1) for t in hv.values()])
    assert torch.allclose(flat_hv, h @ v, rtol=1e-10, atol=1e-12)
    # central finite difference of the gradient along v
    step = 1e-5
    model.train(mode == "train")
    grads = []
    for sign in (1.0, -1.0):
        shifted = make()
        shifted.train(mode == "train")
        with torch.no_grad():
            offset = 0
            for p in shifted.parameters():
                p.add_(sign * step * v[offset : offset + p.numel()].reshape(p.shape))
                offset += p.numel()
        grads.append(flat_grad(shifted, CE, batch))
    fd = (grads[0] - grads[1]) / (2 * step)
    assert torch.allclose(flat_hv, fd, rtol=1e-6, atol=1e-8)


def test_spectral_density_integrates_to_one_and_its_moments_match_traces():
    model, loss, batch, a = _quadratic_case()
    result = L.spectral_density(model, loss, batch, iterations=6, runs=300, seed=3)
    n = a.shape[0]
    for weights in result.weights:
        assert sum(weights) == pytest.approx(1.0, abs=1e-12)
    assert result.moment(0) == pytest.approx(1.0, abs=1e-12)
    grid = torch.linspace(-4, 12, 4001, dtype=torch.float64)
    density = torch.tensor(result.density(grid, sigma=0.2), dtype=torch.float64)
    assert float(torch.trapezoid(density, grid)) == pytest.approx(1.0, abs=1e-6)
    for k, exact in ((1, float(torch.trace(a)) / n), (2, float(torch.trace(a @ a)) / n)):
        per_run = torch.tensor(
            [
                sum(w * t**k for t, w in zip(ts, ws, strict=True))
                for ts, ws in zip(result.nodes, result.weights, strict=True)
            ]
        )
        error = float(per_run.std() / math.sqrt(len(per_run)))
        assert 0 < error < 0.1 * abs(exact)
        assert abs(result.moment(k) - exact) < 4 * error


def test_spectral_density_with_full_lanczos_puts_its_nodes_on_the_eigenvalues():
    model, loss, batch, a = _quadratic_case()
    result = L.spectral_density(model, loss, batch, iterations=12, runs=1)
    eigenvalues = sorted(torch.linalg.eigvalsh(a).tolist())
    assert result.iterations == 12
    for got, want in zip(sorted(result.nodes[0]), eigenvalues, strict=True):
        assert got == pytest.approx(want, abs=1e-8)


def test_a_loader_average_equals_the_probe_on_the_concatenated_batch():
    model = mlp()
    x, y = classification_batch(n=22)
    loader = [(x[:10], y[:10]), (x[10:17], y[10:17]), (x[17:], y[17:])]
    whole = (x, y)
    gen = torch.Generator().manual_seed(6)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64, generator=gen)
    hv_loader = L.hvp(model, CE, loader, v)
    hv_whole = L.hvp(model, CE, whole, v)
    for name in hv_whole:
        assert torch.allclose(hv_loader[name], hv_whole[name], rtol=1e-10, atol=1e-13)
    top_loader = L.top_eigenvalues(model, CE, loader, k=2, tol=1e-10)
    top_whole = L.top_eigenvalues(model, CE, whole, k=2, tol=1e-10)
    assert top_loader.num_batches == 3
    for a_, b_ in zip(top_loader.eigenvalues, top_whole.eigenvalues, strict=True):
        assert _rel(a_, b_) < 1e-9
    c_loader = L.curvature_along_gradient(model, CE, loader)
    c_whole = L.curvature_along_gradient(model, CE, whole)
    assert _rel(c_loader.curvature, c_whole.curvature) < 1e-10
    assert _rel(c_loader.loss, c_whole.loss) < 1e-12
    path_loader = L.gradient_path(model, CE, loader)
    path_whole = L.gradient_path(model, CE, whole)
    for a_, b_ in zip(path_loader.losses, path_whole.losses, strict=True):
        assert _rel(a_, b_) < 1e-12
    # num_batches takes a prefix of the loader
    first = L.curvature_along_gradient(model, CE, loader, num_batches=1)
    alone = L.curvature_along_gradient(model, CE, loader[0])
    assert first.num_batches == 1 and first.curvature == alone.curvature


def test_bad_arguments_raise_value_errors_naming_the_argument():
    model = mlp()
    batch = classification_batch()
    dim = sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="k = "):
        L.top_eigenvalues(model, CE, batch, k=dim + 1)
    with pytest.raises(ValueError, match="k must be"):
        L.top_eigenvalues(model, CE, batch, k=0)
    with pytest.raises(ValueError, match="group '2'"):
        L.top_eigenvalues(model, CE, batch, k=25, groups="layer")
    with pytest.raises(ValueError, match="batch"):
        L.hutchinson_trace(model, CE, (batch[0][:0], batch[1][:0]))
    with pytest.raises(ValueError, match="batch_or_loader"):
        L.hutchinson_trace(model, CE, [])
    with pytest.raises(ValueError, match="num_batches"):
        L.curvature_along_gradient(model, CE, batch, num_batches=0)
    with pytest.raises(ValueError, match="mode"):
        L.curvature_along_gradient(model, CE, batch, mode="inference")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="method"):
        L.curvature_along_gradient(model, CE, batch, method="finite")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="groups"):
        L.top_eigenvalues(model, CE, batch, groups={"g": ["nonexistent"]})
    with pytest.raises(ValueError, match="vector"):
        L.hvp(model, CE, batch, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="samples"):
        L.hutchinson_trace(model, CE, batch, samples=1)
    with pytest.raises(ValueError, match="iterations"):
        L.spectral_density(model, CE, batch, iterations=0)
    with pytest.raises(ValueError, match="no trainable parameters"):
        L.top_eigenvalues(nn.ReLU(), CE, batch)
    frozen = mlp()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        L.hutchinson_trace(frozen, CE, batch)
