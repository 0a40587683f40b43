"""lp, noisy, ghost and renorm BatchNorm: against the float64 reference, torch.nn and gradcheck."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import bnlab.functional as F
import bnlab.nn as bnn
from bnlab.functional import reference as R
from helpers import TOL, rel_err

P_VALUES = [1, 2, math.inf]


@st.composite
def lp_cases(draw):
    rank = draw(st.sampled_from([1, 2]))
    n, c = draw(st.integers(2, 6)), draw(st.integers(1, 4))
    spatial = (draw(st.integers(1, 3)), draw(st.integers(1, 3))) if rank == 2 else ()
    return {
        "shape": (n, c, *spatial),
        "p": draw(st.sampled_from(P_VALUES)),
        "dtype": draw(st.sampled_from([torch.float32, torch.float64])),
        "channels_last": rank == 2 and draw(st.booleans()),
        "centered": draw(st.booleans()),
        "mean": draw(st.sampled_from([0.0, 1.0, -30.0])),
        "kernels": draw(st.booleans()),  # the fused kernels, or the torch-op formulas
        "seed": draw(st.integers(0, 2**16)),
    }


@given(case=lp_cases())
def test_lp_batch_norm_matches_float64_reference(case):
    shape, p, dtype = case["shape"], case["p"], case["dtype"]
    c = shape[1]
    rng = np.random.default_rng(case["seed"])
    gamma, beta = rng.uniform(0.5, 2, size=c), rng.normal(size=c)
    centered = case["centered"]
    layer = (bnn.LpBatchNorm2d if len(shape) == 4 else bnn.LpBatchNorm1d)(
        c, p=p, momentum=0.2, dtype=dtype, centered=centered
    )
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(gamma))
        layer.bias.copy_(torch.from_numpy(beta))
    x = torch.from_numpy(rng.normal(case["mean"], 2.0, size=shape)).to(dtype)
    if case["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    dy = rng.normal(size=shape)
    with F.use_kernels(case["kernels"]):
        y = layer(x)
        y.backward(torch.from_numpy(dy).to(dtype))
    y_ref, cache = R.lp_batch_norm_forward(
        x.detach().double().numpy(), gamma, beta, layer.eps, p, centered=centered
    )
    dx_ref, dgamma_ref, dbeta_ref = R.lp_batch_norm_backward(dy, cache)
    tol = TOL[dtype]
    assert rel_err(y, y_ref) <= tol
    assert rel_err(x.grad, dx_ref) <= tol
    assert rel_err(layer.weight.grad, dgamma_ref) <= tol
    assert rel_err(layer.bias.grad, dbeta_ref) <= tol
    assert rel_err(layer.running_mean, 0.2 * cache.mean) <= tol
    assert rel_err(layer.running_scale, 0.8 + 0.2 * cache.scale) <= tol
    layer.eval()
    x2 = rng.normal(size=shape)
    y_eval = layer(torch.from_numpy(x2).to(dtype))
    expected = R.lp_batch_norm_inference(
        x2, layer.running_mean.double().numpy(), layer.running_scale.double().numpy(), gamma, beta
    )
    assert rel_err(y_eval, expected) <= tol


@pytest.mark.parametrize("kernels_on", [True, False])
def test_centered_l2_batch_norm_equals_batch_norm_in_training(kernels_on):
    x = (torch.randn(8, 3, 4, 4, dtype=torch.float64) * 2 + 1).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    dy = torch.randn_like(x)
    with F.use_kernels(kernels_on):
        y_l2 = bnn.LpBatchNorm2d(3, p=2, centered=True, dtype=torch.float64)(x)
        y_l2.backward(dy)
        y = bnn.BatchNorm2d(3, dtype=torch.float64)(x2)
        y.backward(dy)
    torch.testing.assert_close(y_l2, y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernels_on", [True, False])
def test_paper_l2_divides_by_the_root_mean_square_so_differs_from_batch_norm(kernels_on):
    """With mean 3 and standard deviation 2 per channel, BN divides by about 2 and the paper's
    l2 by sqrt(2^2 + 3^2) (the lp norm before shifting the mean); with mean 0 they agree."""
    x = torch.randn(64, 3, 4, 4, dtype=torch.float64) * 2 + 3
    with F.use_kernels(kernels_on):
        paper = bnn.LpBatchNorm2d(3, p=2, dtype=torch.float64)
        bn = bnn.BatchNorm2d(3, dtype=torch.float64)
        y_paper, y_bn = paper(x), bn(x)
        rms = x.pow(2).mean((0, 2, 3)).add(paper.eps).sqrt()
        std = x.var((0, 2, 3), unbiased=False).add(bn.eps).sqrt()
        torch.testing.assert_close(y_paper, y_bn * (std / rms).view(1, 3, 1, 1))
        assert (std / rms).max() < 0.7
        torch.testing.assert_close(paper.running_scale, 0.9 + 0.1 * rms)
        centred = x - x.mean((0, 2, 3), keepdim=True)
        torch.testing.assert_close(
            bnn.LpBatchNorm2d(3, p=2, dtype=torch.float64)(centred),
            bnn.BatchNorm2d(3, dtype=torch.float64)(centred),
        )


def test_lp_rejects_unknown_p():
    with pytest.raises(ValueError, match="p must be 1, 2 or inf"):
        bnn.LpBatchNorm2d(3, p=3)


# --- gradcheck in float64 for every variant ---------------------------------------------------

VARIANTS = {
    "bn": lambda: bnn.BatchNorm2d(3, dtype=torch.float64),
    "l1": lambda: bnn.LpBatchNorm2d(3, p=1, dtype=torch.float64),
    "l2": lambda: bnn.LpBatchNorm2d(3, p=2, dtype=torch.float64),
    "linf": lambda: bnn.LpBatchNorm2d(3, p=math.inf, dtype=torch.float64),
    "l1_centered": lambda: bnn.LpBatchNorm2d(3, p=1, centered=True, dtype=torch.float64),
    "linf_centered": lambda: bnn.LpBatchNorm2d(3, p=math.inf, centered=True, dtype=torch.float64),
    "noisy_bn": lambda: bnn.NoisyBatchNorm2d(3, seed=0, dtype=torch.float64),
    "ghost": lambda: bnn.GhostBatchNorm2d(3, virtual_batch_size=2, dtype=torch.float64),
    # Renorm's r and d are constants in the backward pass by design (Ioffe 2017); with running
    # statistics far from the batch both are clipped, so the forward is locally the function the
    # backward differentiates and gradcheck is meaningful.
    "renorm": lambda: _far_renorm(),
}


def _far_renorm() -> bnn.BatchRenorm2d:
    layer = bnn.BatchRenorm2d(3, r_max=3.0, d_max=5.0, dtype=torch.float64)
    with torch.no_grad():
        layer.running_mean.fill_(-1000.0)
        layer.running_var.fill_(1e4)
    return layer


@pytest.mark.parametrize("kind", sorted(VARIANTS))
def test_gradcheck_float64(kind):
    torch.manual_seed(0)
    x = (torch.randn(5, 3, 2, 3, dtype=torch.float64) * 2 + 1).requires_grad_()
    template = VARIANTS[kind]()
    weight = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(3, dtype=torch.float64).requires_grad_()

    def f(x, weight, bias):
        layer = VARIANTS[kind]()  # the same running statistics and noise draw on every call
        layer.load_state_dict(template.state_dict())
        return torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(f, (x, weight, bias))


def test_variants_reject_wrong_channel_count():
    for kind in ("noisy_bn", "l1", "ghost", "renorm"):
        layer = bnn.norm_layer(kind, 4, rank=2)
        with pytest.raises(ValueError, match=r"expects 4 channels, got 3"):
            layer(torch.randn(2, 3, 2, 2))


# --- noisy BatchNorm --------------------------------------------------------------------------


def test_noisy_is_off_in_eval_and_equals_batch_norm_there():
    noisy, plain = bnn.NoisyBatchNorm2d(3, seed=1), bnn.BatchNorm2d(3)
    x = torch.randn(8, 3, 4, 4)
    noisy(x), plain(x)
    noisy.eval()
    plain.eval()
    assert torch.equal(noisy(x), plain(x))


def test_noisy_is_reproducible_from_seed_and_generator_and_changes_every_step():
    x = torch.randn(8, 3, 4, 4)
    a, b = bnn.NoisyBatchNorm2d(3, seed=7), bnn.NoisyBatchNorm2d(3, seed=7)
    ya1, ya2 = a(x), a(x)
    assert torch.equal(ya1, b(x)) and torch.equal(ya2, b(x))
    assert not torch.equal(ya1, ya2)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(
        bnn.NoisyBatchNorm2d(3, generator=g1)(x), bnn.NoisyBatchNorm2d(3, generator=g2)(x)
    )


def test_frozen_noise_repeats_one_draw_and_restores_the_step_counter():
    layer = bnn.NoisyBatchNorm2d(3, seed=5)
    x = torch.randn(4, 3, 2, 2)
    layer(x)
    with bnn.frozen_noise(layer):
        first, second = layer(x), layer(x)
    assert torch.equal(first, second)
    assert int(layer.noise_steps) == 1
    twin = bnn.NoisyBatchNorm2d(3, seed=5)
    twin(x)
    assert torch.equal(layer(x), twin(x))  # step 1's noise, as if the block had never drawn
    assert int(layer.noise_steps) == 2


def test_noisy_step_t_uses_the_key_of_step_t_and_eval_draws_nothing():
    from bnlab.functional.noise import seed_key, step_key

    layer = bnn.NoisyBatchNorm2d(3, seed=21, momentum=None)
    x = torch.randn(4, 3, 2, 2)
    for t in range(3):
        expected = F.batch_norm(
            x, None, None, layer.weight, layer.bias, True,
            noise=F.NoiseDraw(layer.noise, step_key(seed_key(21), t)),
        )  # fmt: skip
        assert torch.equal(layer(x), expected), t
    layer.eval()
    layer(x)
    assert int(layer.noise_steps) == 3 and layer.noise_key.tolist() == list(seed_key(21))


@given(
    base=st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**31 - 1)),
    step=st.integers(0, 2**62),
)
def test_step_keys_are_the_same_from_ints_and_from_tensors(base, step):
    """Eager mode computes a step's key on Python ints, torch.compile on int64 tensors."""
    from bnlab.functional.noise import step_key

    ints = step_key(base, step)
    tensors = step_key((torch.tensor(base[0]), torch.tensor(base[1])), torch.tensor(step))
    assert [int(t) for t in tensors] == list(ints)
    assert 0 <= ints[0] < 2**32 and 0 <= ints[1] < 2**31


def test_noisy_draws_inside_and_outside_inference_mode(monkeypatch):
    """A step under inference_mode advances the layer's counter like any other; the functional
    draw's reused buffer, made under inference_mode, stays writable outside it."""
    import threading

    from bnlab.functional import noise

    monkeypatch.setattr(noise, "_buffers", threading.local())  # the first draw makes it
    a, b = bnn.NoisyBatchNorm2d(3, seed=4), bnn.NoisyBatchNorm2d(3, seed=4)
    x = torch.randn(4, 3, 2, 2)
    with torch.inference_mode():
        first = a(x)
        drawn = F.draw_noise(x, a.noise, torch.Generator().manual_seed(1))
    second = a(x)
    assert torch.equal(first, b(x)) and torch.equal(second, b(x))
    assert not torch.equal(first, second)
    assert drawn == F.draw_noise(x, a.noise, torch.Generator().manual_seed(1))


def test_noisy_noise_stream_travels_in_the_state_dict():
    a = bnn.NoisyBatchNorm2d(3, seed=11)
    x = torch.randn(4, 3, 2, 2)
    a(x)
    assert {"noise_key", "noise_steps"} <= set(a.state_dict())
    b = bnn.NoisyBatchNorm2d(3, seed=99)
    b(x)  # b has drawn from its own stream before the load
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x), b(x)) and torch.equal(a(x), b(x))


def test_a_noisy_state_dict_from_before_the_step_counter_loads():
    """Older checkpoints held the layer's generator in _extra_state: they load, and the noise
    continues from the layer's own base key."""
    layer = bnn.NoisyBatchNorm2d(3, seed=2)
    old = {k: v for k, v in layer.state_dict().items() if not k.startswith("noise_")}
    old["_extra_state"] = {"generator": torch.Generator().manual_seed(2).get_state()}
    layer.load_state_dict(old)
    assert int(layer.noise_steps) == 0


def test_noisy_layer_rejects_bad_constants():
    with pytest.raises(ValueError, match="n_sigma >= 1"):
        bnn.NoisyBatchNorm2d(3, n_sigma=0.5)


# --- ghost BatchNorm --------------------------------------------------------------------------


def test_ghost_normalizes_each_virtual_batch_like_torch():
    x = torch.randn(12, 3, 2, 2, dtype=torch.float64) * 3 + 1
    ghost = bnn.GhostBatchNorm2d(3, virtual_batch_size=4, momentum=0.5, dtype=torch.float64)
    y = ghost(x)
    reference = torch.nn.BatchNorm2d(3, dtype=torch.float64)
    for chunk, out in zip(x.split(4), y.split(4), strict=True):
        torch.testing.assert_close(out, reference(chunk), rtol=1e-12, atol=1e-12)
    chunks = x.split(4)
    mean = torch.stack([c.mean((0, 2, 3)) for c in chunks]).mean(0)
    var = torch.stack([c.var((0, 2, 3), unbiased=True) for c in chunks]).mean(0)
    torch.testing.assert_close(ghost.running_mean, 0.5 * mean)
    torch.testing.assert_close(ghost.running_var, 0.5 + 0.5 * var)


def test_ghost_with_a_batch_no_larger_than_the_virtual_batch_is_batch_norm():
    x = torch.randn(6, 3, dtype=torch.float64)
    torch.testing.assert_close(
        bnn.GhostBatchNorm1d(3, virtual_batch_size=8, dtype=torch.float64)(x),
        torch.nn.BatchNorm1d(3, dtype=torch.float64)(x),
    )


def test_ghost_uneven_last_chunk():
    x = torch.randn(10, 2, dtype=torch.float64)
    y = bnn.GhostBatchNorm1d(2, virtual_batch_size=4, dtype=torch.float64)(x)
    torch.testing.assert_close(y[8:], torch.nn.BatchNorm1d(2, dtype=torch.float64)(x[8:]))


# --- batch renormalization --------------------------------------------------------------------


def test_renorm_without_correction_is_batch_norm_forward_and_backward():
    x = (torch.randn(8, 3, 2, 2, dtype=torch.float64) * 2 + 5).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    dy = torch.randn_like(x)
    renorm = bnn.BatchRenorm2d(3, r_max=1.0, d_max=0.0, dtype=torch.float64)
    plain = torch.nn.BatchNorm2d(3, dtype=torch.float64)
    y1, y2 = renorm(x), plain(x2)
    y1.backward(dy)
    y2.backward(dy)
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(renorm.running_var, plain.running_var)


def test_renorm_matches_reference_forward():
    rng = np.random.default_rng(0)
    x = rng.normal(4, 3, size=(16, 3))
    gamma, beta = rng.uniform(0.5, 2, size=3), rng.normal(size=3)
    rm, rv = np.array([0.0, 3.5, 10.0]), np.array([1.0, 9.0, 0.01])
    layer = bnn.BatchRenorm1d(3, r_max=2.0, d_max=1.0, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(gamma))
        layer.bias.copy_(torch.from_numpy(beta))
        layer.running_mean.copy_(torch.from_numpy(rm))
        layer.running_var.copy_(torch.from_numpy(rv))
    y = layer(torch.from_numpy(x))
    y_ref, r, d = R.batch_renorm_forward(x, gamma, beta, rm, rv, layer.eps, 2.0, 1.0)
    assert rel_err(y, y_ref) <= 1e-10
    assert r.min() < r.max() and np.any(np.abs(d) == 1.0)  # clipping is exercised
