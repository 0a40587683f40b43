"""bnlab.nn.BatchNorm1d/2d/3d against torch.nn and the float64 reference, in every mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import bnlab.nn as bnn
from bnlab.functional import reference as R
from helpers import TOL, rel_err

RANKS = {
    1: (bnn.BatchNorm1d, torch.nn.BatchNorm1d),
    2: (bnn.BatchNorm2d, torch.nn.BatchNorm2d),
    3: (bnn.BatchNorm3d, torch.nn.BatchNorm3d),
}


@st.composite
def layer_cases(draw):
    rank = draw(st.sampled_from([1, 2, 3]))
    n = draw(st.integers(2, 6))
    c = draw(st.integers(1, 5))
    spatial = {
        1: draw(st.sampled_from([(), (3,), (5,), (64,), (67,)])),
        2: draw(
            st.sampled_from([(8, 8), (9, 11)]) | st.tuples(st.integers(1, 4), st.integers(1, 4))
        ),
        3: draw(
            st.sampled_from([(4, 4, 4), (3, 5, 6)])
            | st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3))
        ),
    }[rank]  # from 64 values per (sample, channel) the kernels take the planar layout
    return {
        "rank": rank,
        "shape": (n, c, *spatial),
        "momentum": draw(st.sampled_from([0.1, 0.5, None])),
        "affine": draw(st.booleans()),
        "track": draw(st.booleans()),
        "channels_last": rank > 1 and draw(st.booleans()),
        "dtype": draw(st.sampled_from([torch.float32, torch.float64])),
        "seed": draw(st.integers(0, 2**16)),
    }


def _to_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    if not channels_last:
        return x
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return x.contiguous(memory_format=fmt)


@given(case=layer_cases())
def test_matches_torch_nn_over_training_steps_and_eval(case):
    ours_cls, torch_cls = RANKS[case["rank"]]
    c, dtype = case["shape"][1], case["dtype"]
    kwargs = {
        "momentum": case["momentum"],
        "affine": case["affine"],
        "track_running_stats": case["track"],
        "dtype": dtype,
    }
    ours, theirs = ours_cls(c, **kwargs), torch_cls(c, **kwargs)
    gen = torch.Generator().manual_seed(case["seed"])
    if case["affine"]:
        with torch.no_grad():
            for layer in (ours, theirs):
                layer.weight.copy_(torch.linspace(0.5, 2.0, c, dtype=dtype))
                layer.bias.copy_(torch.linspace(-1.0, 1.0, c, dtype=dtype))
    tol = TOL[dtype]
    for _ in range(3):
        x = torch.randn(case["shape"], generator=gen, dtype=dtype) * 3 + 2
        x = _to_format(x, case["channels_last"])
        dy = torch.randn(case["shape"], generator=gen, dtype=dtype)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), theirs(xb)
        ya.backward(dy)
        yb.backward(dy)
        assert rel_err(ya, yb) <= tol
        assert rel_err(xa.grad, xb.grad) <= tol
        if case["affine"]:
            assert rel_err(ours.weight.grad, theirs.weight.grad) <= tol
            assert rel_err(ours.bias.grad, theirs.bias.grad) <= tol
        if case["channels_last"]:
            assert ya.is_contiguous(memory_format=_memory_format(x))
    if case["track"]:
        assert rel_err(ours.running_mean, theirs.running_mean) <= tol
        assert rel_err(ours.running_var, theirs.running_var) <= tol
        assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 3
    ours.eval()
    theirs.eval()
    x = _to_format(torch.randn(case["shape"], generator=gen, dtype=dtype), case["channels_last"])
    assert rel_err(ours(x), theirs(x)) <= tol


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


@given(case=layer_cases())
def test_matches_float64_reference(case):
    ours_cls, _ = RANKS[case["rank"]]
    dtype, shape = case["dtype"], case["shape"]
    c = shape[1]
    rng = np.random.default_rng(case["seed"])
    x64 = rng.normal(1.5, 2.5, size=shape)
    dy64 = rng.normal(size=shape)
    gamma, beta = rng.uniform(0.5, 2, size=c), rng.normal(size=c)
    layer = ours_cls(c, momentum=0.3, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(gamma))
        layer.bias.copy_(torch.from_numpy(beta))
    x = _to_format(torch.from_numpy(x64).to(dtype), case["channels_last"]).requires_grad_()
    y = layer(x)
    y.backward(torch.from_numpy(dy64).to(dtype))
    # The reference sees the same (rounded) input the layer saw.
    y_ref, cache = R.batch_norm_forward(x.detach().double().numpy(), gamma, beta, eps=layer.eps)
    dx_ref, dgamma_ref, dbeta_ref = R.batch_norm_backward(dy64, cache)
    tol = TOL[dtype]
    assert rel_err(y, y_ref) <= tol
    assert rel_err(x.grad, dx_ref) <= tol
    assert rel_err(layer.weight.grad, dgamma_ref) <= tol
    assert rel_err(layer.bias.grad, dbeta_ref) <= tol
    m = x64.size // c
    assert rel_err(layer.running_mean, R.running_update(np.zeros(c), cache.mean, 0.3)) <= tol
    unbiased = R.unbiased_variance(cache.scale**2 - layer.eps, m)
    assert rel_err(layer.running_var, R.running_update(np.ones(c), unbiased, 0.3)) <= tol


@pytest.mark.parametrize("shape", [(4, 3, 64), (4, 3, 8, 8), (2, 3, 4, 4, 5)])
def test_spatial_sizes_from_64_take_the_planar_layout_and_match_torch_nn(shape):
    from bnlab.functional import kernels

    torch_cls, bn_cls = RANKS[len(shape) - 2][1], RANKS[len(shape) - 2][0]
    torch.manual_seed(0)
    x = torch.randn(shape) * 3 + 5
    ours, theirs = bn_cls(3), torch_cls(3)
    kernels.plan._plans.clear()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), theirs(xb)
    assert [p.planar for p in kernels.plan._plans.values()] == [True]
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    assert rel_err(ya, yb) <= TOL[torch.float32]
    assert rel_err(xa.grad, xb.grad) <= TOL[torch.float32]
    assert rel_err(ours.weight.grad, theirs.weight.grad) <= TOL[torch.float32]
    assert rel_err(ours.running_var, theirs.running_var) <= TOL[torch.float32]


def test_running_var_is_unbiased():
    layer = bnn.BatchNorm1d(1, momentum=1.0)
    x = torch.tensor([[1.0], [2.0], [3.0], [6.0]])
    layer(x)
    assert layer.running_var.item() == pytest.approx(x.var(unbiased=True).item(), rel=1e-6)
    assert layer.running_mean.item() == pytest.approx(3.0)


def test_momentum_none_is_cumulative_average():
    layer = bnn.BatchNorm1d(2, momentum=None)
    batches = [torch.randn(8, 2) * (i + 1) + i for i in range(5)]
    for b in batches:
        layer(b)
    expected_mean = torch.stack([b.mean(0) for b in batches]).mean(0)
    expected_var = torch.stack([b.var(0, unbiased=True) for b in batches]).mean(0)
    torch.testing.assert_close(layer.running_mean, expected_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.running_var, expected_var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_state_dict_loads_both_ways(rank):
    ours_cls, torch_cls = RANKS[rank]
    shape = (4, 3, *([2] * (rank if rank > 1 else 0)))
    theirs = torch_cls(3)
    theirs(torch.randn(shape) * 2 + 1)
    ours = ours_cls(3)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    ours(torch.randn(shape))
    fresh = torch_cls(3)
    fresh.load_state_dict(ours.state_dict())
    for key, value in ours.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_old_state_dict_without_num_batches_tracked_loads():
    layer = bnn.BatchNorm2d(3)
    state = {
        k: v for k, v in torch.nn.BatchNorm2d(3).state_dict().items() if k != "num_batches_tracked"
    }
    state = type(torch.nn.BatchNorm2d(3).state_dict())(state)
    state._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
    layer.load_state_dict(state)
    assert layer.num_batches_tracked.item() == 0


def test_track_running_stats_false_uses_batch_statistics_in_eval():
    ours, theirs = (
        bnn.BatchNorm2d(3, track_running_stats=False),
        torch.nn.BatchNorm2d(3, track_running_stats=False),
    )
    ours.eval()
    theirs.eval()
    x = torch.randn(4, 3, 2, 2) * 5 + 3
    torch.testing.assert_close(ours(x), theirs(x))
    assert ours.running_mean is None and "running_mean" not in ours.state_dict()


def test_eval_uses_running_statistics_and_ignores_batch():
    layer = bnn.BatchNorm1d(2)
    layer.eval()
    x = torch.randn(5, 2) * 10 + 4
    y = layer(x)
    torch.testing.assert_close(y, x / torch.sqrt(torch.tensor(1.0 + 1e-5)))
    assert layer.num_batches_tracked.item() == 0


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bn", "lp"])
@pytest.mark.parametrize("buffer", ["running_mean", "second", "weight", "bias"])
def test_eval_with_a_buffer_of_the_wrong_size_names_it(kind, buffer):
    """Eval goes from the module straight to the running-statistics normalization: a buffer or
    parameter replaced by one of another size is refused by name, never read past its end."""
    layer = bnn.BatchNorm2d(4) if kind == "bn" else bnn.LpBatchNorm2d(4, p=1)
    name = {"second": layer._scale_buffer}.get(buffer, buffer)
    if buffer in ("weight", "bias"):
        setattr(layer, name, torch.nn.Parameter(torch.ones(3)))
    else:
        setattr(layer, name, torch.ones(3))
    layer.eval()
    cls = type(layer).__name__
    with pytest.raises(ValueError, match=rf"{cls}: {name} should contain 4 elements, .* got 3"):
        layer(torch.randn(2, 4, 3, 3))


FUNCTIONS = {
    "batch_norm": ("running_var", {}),
    "lp_batch_norm": ("running_scale", {"p": 1}),
    "ghost_batch_norm": ("running_var", {"virtual_batch_size": 2}),
    "batch_renorm": ("running_var", {}),
}


@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("which", ["running_mean", "second", "weight", "bias"])
@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("function", list(FUNCTIONS))
def test_functional_refuses_a_tensor_of_the_wrong_size_by_name(
    function, size, which, training, kernels
):
    """Every functional form checks running_mean, the second running buffer, weight and bias
    against the input's channels (torch's rule: C elements), training and eval, on the kernels
    and the torch-op path: a shorter one would be read past its end."""
    import bnlab.functional as F

    second, extra = FUNCTIONS[function]
    tensors = {"running_mean": torch.zeros(3), "second": torch.ones(3), "weight": torch.ones(3)}
    tensors["bias"] = torch.zeros(3)
    tensors[which] = torch.ones(size)
    name = second if which == "second" else which
    x = torch.randn(4, 3, 5, 5)
    with (
        F.use_kernels(kernels),
        pytest.raises(
            ValueError,
            match=rf"{function}: {name} should contain 3 elements, one per channel of the input "
            rf"of shape \(4, 3, 5, 5\), got {size} \(shape \({size},\)\)",
        ),
    ):
        getattr(F, function)(
            x, tensors["running_mean"], tensors["second"], tensors["weight"], tensors["bias"],
            training, **extra,
        )  # fmt: skip


def test_per_channel_tensors_of_other_shapes_follow_torch():
    """A (C, 1) weight is used as (C,) (its gradient keeps its shape); a (1, C) running_mean
    moves in place; a 0-d weight for several channels is refused by name."""
    import bnlab.functional as F

    x = torch.randn(6, 3, 4, 4)
    weight = torch.nn.Parameter(torch.rand(3, 1) + 0.5)
    running_mean = torch.zeros(1, 3)
    y = F.batch_norm(x, running_mean, torch.ones(3), weight, None, training=True)
    want = torch.nn.functional.batch_norm(
        x, torch.zeros(3), torch.ones(3), weight.detach().view(3), None, training=True
    )
    assert rel_err(y, want) <= 1e-6
    y.sum().backward()
    assert weight.grad is not None and weight.grad.shape == (3, 1)
    assert rel_err(running_mean.view(3), 0.1 * x.mean((0, 2, 3))) <= 1e-6
    with pytest.raises(
        ValueError, match=r"weight should contain 3 elements, .* got 1 \(shape \(\)\)"
    ):
        F.batch_norm(x, None, None, torch.tensor(1.0), None, training=True)


def test_wrong_channel_count_names_expected_and_actual():
    with pytest.raises(
        ValueError, match=r"BatchNorm2d expects 64 channels, got 32 \(input shape \(8, 32, 4, 4\)\)"
    ):
        bnn.BatchNorm2d(64)(torch.randn(8, 32, 4, 4))


@pytest.mark.parametrize(
    ("cls", "shape", "expected"),
    [
        (bnn.BatchNorm1d, (2, 3, 4, 5), "2-D or 3-D"),
        (bnn.BatchNorm2d, (2, 3, 4), "4-D"),
        (bnn.BatchNorm3d, (2, 3, 4, 5), "5-D"),
    ],
)
def test_wrong_rank_names_expected_and_actual(cls, shape, expected):
    with pytest.raises(
        ValueError, match=rf"expects a {expected} input .* got a {len(shape)}-D input"
    ):
        cls(3)(torch.randn(shape))


def test_one_value_per_channel_in_training_raises_like_torch():
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        bnn.BatchNorm1d(3)(torch.randn(1, 3))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        torch.nn.BatchNorm1d(3)(torch.randn(1, 3))
    layer = bnn.BatchNorm2d(3)
    layer(torch.randn(1, 3, 2, 2))  # a batch of one image still has 4 values per channel
    layer.eval()
    layer(torch.randn(1, 3, 1, 1))  # eval mode needs no batch statistics


def test_integer_input_names_the_dtype():
    with pytest.raises(TypeError, match=r"floating-point input, got dtype torch\.int64"):
        bnn.BatchNorm1d(3)(torch.ones(4, 3, dtype=torch.long))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_features": 0}, "num_features"),
        ({"num_features": 3, "eps": 0.0}, "eps"),
        ({"num_features": 3, "momentum": 1.5}, "momentum"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bnn.BatchNorm2d(**kwargs)


# --- hostile inputs ---------------------------------------------------------------------------


def test_large_mean_channel_stays_accurate_in_float32():
    """Mean 1e4, std 1: E[x^2] - E[x]^2 would lose every digit of the variance in float32."""
    rng = np.random.default_rng(0)
    x64 = rng.normal(size=(64, 3, 8, 8))
    x64[:, 1] += 1e4
    x32 = torch.from_numpy(x64).float()
    layer = bnn.BatchNorm2d(3)
    xg = x32.clone().requires_grad_()
    y = layer(xg)
    dy = rng.normal(size=x64.shape)
    y.backward(torch.from_numpy(dy).float())
    y_ref, cache = R.batch_norm_forward(x32.double().numpy(), np.ones(3), np.zeros(3))
    dx_ref, _, _ = R.batch_norm_backward(dy, cache)
    assert rel_err(y, y_ref) <= 1e-4
    assert rel_err(xg.grad, dx_ref) <= 1e-4
    assert rel_err(layer.running_mean, 0.1 * cache.mean) <= 1e-4


def test_constant_channel_gives_finite_outputs_and_gradients():
    x = torch.randn(8, 3, 4, 4)
    x[:, 2] = 7.0
    x.requires_grad_()
    layer = bnn.BatchNorm2d(3)
    y = layer(x)
    y.backward(torch.randn_like(y))
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert torch.isfinite(layer.weight.grad).all()
    torch.testing.assert_close(y[:, 2], torch.zeros_like(y[:, 2]))


def test_nan_in_one_channel_leaves_the_others_untouched():
    x = torch.randn(6, 4, 3, 3)
    dy = torch.randn_like(x)
    clean, poisoned = x.clone().requires_grad_(), x.clone()
    poisoned[2, 1, 0, 0] = float("nan")
    poisoned.requires_grad_()
    a, b = bnn.BatchNorm2d(4), bnn.BatchNorm2d(4)
    ya, yb = a(clean), b(poisoned)
    ya.backward(dy)
    yb.backward(dy)
    others = [0, 2, 3]
    assert torch.equal(ya[:, others], yb[:, others])
    assert torch.equal(clean.grad[:, others], poisoned.grad[:, others])
    assert torch.equal(a.running_var[others], b.running_var[others])
    assert torch.isnan(yb[:, 1]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_matches_float64_reference_within_rounding(dtype):
    rng = np.random.default_rng(1)
    x64 = rng.normal(2.0, 3.0, size=(16, 4, 5, 5))
    x = torch.from_numpy(x64).to(dtype).requires_grad_()
    layer = bnn.BatchNorm2d(4).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    dy = torch.from_numpy(rng.normal(size=x64.shape)).to(dtype)
    y.backward(dy)
    y_ref, cache = R.batch_norm_forward(x.detach().double().numpy(), np.ones(4), np.zeros(4))
    dx_ref, _, _ = R.batch_norm_backward(dy.double().numpy(), cache)
    unit = torch.finfo(dtype).eps  # spacing at 1: outputs are O(1), so rounding is O(unit)
    assert np.max(np.abs(y.detach().double().numpy() - y_ref)) <= 4 * unit * np.max(np.abs(y_ref))
    assert x.grad.dtype == dtype
    assert np.max(np.abs(x.grad.double().numpy() - dx_ref)) <= 8 * unit * np.max(np.abs(dx_ref))
    assert layer.running_mean.dtype == dtype


# --- torch 2.13's bias=False and empty batches, for every variant -----------------------------

VARIANT_KINDS = ("bn", "noisy_bn", "l1", "linf", "ghost", "renorm")


@pytest.mark.parametrize("kind", VARIANT_KINDS)
def test_affine_without_bias_has_a_weight_only(kind):
    """``bias=False``: no bias parameter or state_dict entry; the output is the biased layer's
    with a zero bias, and the weight's gradient is the same."""
    torch.manual_seed(0)
    plain = bnn.norm_layer(kind, 3, 2, bias=False, momentum=0.3)
    biased = bnn.norm_layer(kind, 3, 2, momentum=0.3)
    assert plain.bias is None and "bias" not in plain.state_dict()
    assert [n for n, _ in plain.named_parameters()] == ["weight"]
    assert "bias=False" in repr(plain)
    with torch.no_grad():
        for layer in (plain, biased):
            layer.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
    x = torch.randn(6, 3, 4, 4) * 2 + 1
    if kind == "noisy_bn":  # the same noise stream in both
        biased.noise_key.copy_(plain.noise_key)
    ya, yb = plain(x), biased(x)
    torch.testing.assert_close(ya, yb)
    ya.sum().backward()
    yb.sum().backward()
    torch.testing.assert_close(plain.weight.grad, biased.weight.grad)
    plain.eval()
    biased.eval()
    torch.testing.assert_close(plain(x), biased(x))


@pytest.mark.parametrize("kind", VARIANT_KINDS)
@pytest.mark.parametrize("track", [True, False])
def test_empty_training_batch_gives_an_empty_output_like_torch(kind, track):
    """torch.nn's rule: a batch of zero samples normalizes to an empty output that stays in the
    graph (zero parameter gradients); the batch is counted, the running statistics stay."""
    layer = bnn.norm_layer(kind, 5, 2, track_running_stats=track)
    theirs = torch.nn.BatchNorm2d(5, track_running_stats=track)
    before = {k: v.clone() for k, v in layer.named_buffers() if k != "num_batches_tracked"}
    x = torch.randn(0, 5, 2, 2, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 5, 2, 2) and y.grad_fn is not None
    y.sum().backward()
    theirs(x).sum().backward()
    assert torch.equal(layer.weight.grad, theirs.weight.grad)  # zeros, not None
    assert torch.equal(layer.bias.grad, theirs.bias.grad)
    for key, value in before.items():
        assert torch.equal(getattr(layer, key), value), key
    if track:
        assert layer.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 1
    layer.eval()
    assert layer(torch.randn(0, 5, 2, 2)).shape == (0, 5, 2, 2)
