"""bnlab.models: shapes, norm placement, seeded initialization, the registry's errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bnlab.models import MODELS, VGG, build_model, init_parameters
from bnlab.nn import NORM_KINDS, BatchNorm, NoisyBatchNorm, is_norm_layer, variant

CASES = {
    "vgg_digits": ((1, 8, 8), 10),
    "vgg": ((3, 16, 16), 5),
    "mlp": ((30,), 2),
    "dln": ((10,), 10),
    "logistic": ((2,), 2),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("norm", NORM_KINDS)
def test_every_model_takes_every_norm_kind(name: str, norm: str) -> None:
    shape, outputs = CASES[name]
    options = {"widths": (4, 8)} if name == "vgg" else {}
    if name == "dln":
        options = {"depth": 4}
    model = build_model(name, shape, outputs, norm=norm, **options)
    model.train()
    out = model(torch.randn(16, *shape))
    assert out.shape == (16, outputs)
    norms = [m for m in model.modules() if is_norm_layer(m)]
    if norm == "none":
        assert norms == []
    else:
        assert norms and all(isinstance(m, variant(norm).classes) for m in norms)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_vgg16_has_the_parameter_count_of_the_cifar_vgg16() -> None:
    # torchvision's VGG-16 features hold 14,714,688 parameters; the CIFAR head is Linear(512, 10)
    # and BN adds a weight and a bias per channel of its 13 convolutions (4224 channels).
    plain = build_model("vgg16", (3, 32, 32), 10, norm="none")
    with_bn = build_model("vgg16", (3, 32, 32), 10, norm="bn")
    assert _count(plain) == 14_714_688 + 512 * 10 + 10
    assert _count(with_bn) == _count(plain) + 2 * 4224


def test_vgg_digits_preset_is_two_stages_of_16_and_32_channels() -> None:
    model = build_model("vgg_digits", (1, 8, 8), 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32]
    linear = next(m for m in model.modules() if isinstance(m, nn.Linear))
    assert linear.in_features == 32 * 2 * 2


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    a = build_model("mlp", (64,), 10, seed=3)
    b = build_model("mlp", (64,), 10, seed=3)
    c = build_model("mlp", (64,), 10, seed=4)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.layers[1].weight, c.layers[1].weight)


def test_building_a_model_leaves_the_global_rng_alone() -> None:
    state = torch.get_rng_state()
    build_model("vgg_digits", (1, 8, 8), 10, seed=1)
    assert torch.equal(state, torch.get_rng_state())


def test_init_scale_multiplies_every_weight_and_keeps_biases_zero() -> None:
    base = build_model("vgg_digits", (1, 8, 8), 10, seed=0)
    scaled = build_model("vgg_digits", (1, 8, 8), 10, seed=0, init_scale=10.0)
    for (name, p), q in zip(base.named_parameters(), scaled.parameters(), strict=True):
        if name.endswith("bias"):
            assert not p.any() and not q.any()
        elif p.dim() > 1:
            torch.testing.assert_close(q, 10.0 * p, rtol=1e-6, atol=0)


def test_kaiming_init_has_std_sqrt_two_over_fan_in() -> None:
    layer = nn.Linear(400, 500)
    init_parameters(layer, seed=0, scale=1.0, scheme="kaiming")
    expected = math.sqrt(2.0 / 400)
    # 200k samples: the sample std is within 1% of the true one with overwhelming probability
    assert abs(float(layer.weight.detach().std()) / expected - 1) < 0.01
    init_parameters(layer, seed=0, scale=1.0, scheme="xavier")
    assert abs(float(layer.weight.detach().std()) * math.sqrt(400) - 1) < 0.01


def test_deep_linear_network_is_linear_in_its_input() -> None:
    model = build_model("dln", (10,), 10, depth=25).double()
    x1, x2 = torch.randn(5, 10, dtype=torch.float64), torch.randn(5, 10, dtype=torch.float64)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 25
    torch.testing.assert_close(model(2 * x1 - 3 * x2), 2 * model(x1) - 3 * model(x2))


def test_noisy_layers_get_distinct_reproducible_seeds() -> None:
    model = build_model("vgg_digits", (1, 8, 8), 10, norm="noisy_bn", seed=5)
    seeds = [m.seed for m in model.modules() if isinstance(m, NoisyBatchNorm)]
    assert len(seeds) == 2 and len(set(seeds)) == 2
    x = torch.randn(8, 1, 8, 8)
    again = build_model("vgg_digits", (1, 8, 8), 10, norm="noisy_bn", seed=5)
    torch.testing.assert_close(model(x), again(x), rtol=0, atol=0)


def test_logistic_regression_normalizes_its_inputs() -> None:
    model = build_model("logistic", (2,), 2, norm="bn")
    assert isinstance(model.layers[1], BatchNorm)
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 1


def test_unknown_model_and_option_errors_list_the_choices() -> None:
    with pytest.raises(ValueError, match=r"known models: .*vgg_digits"):
        build_model("resnet", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="no option 'depth'; its options: hidden"):
        build_model("mlp", (4,), 2, depth=3)
    with pytest.raises(ValueError, match="unknown norm kind"):
        build_model("mlp", (4,), 2, norm="batch")
    with pytest.raises(ValueError, match="init_scale must be positive"):
        build_model("mlp", (4,), 2, init_scale=0.0)
    with pytest.raises(ValueError, match=r"VGG expects \(C, H, W\)"):
        VGG((64,), 10)


def test_registry_names_are_all_buildable() -> None:
    assert {"vgg", "vgg16", "vgg_digits", "mlp", "dln", "logistic"} <= set(MODELS)


def test_digits_preset_costs_under_100k_multiply_adds_per_sample() -> None:
    # the study trains it many times on two cores: its cost is what keeps a step at a few ms
    # (about 5 ms at batch 128 on one idle core; wall-clock time is not asserted on a shared
    # machine). Count the multiply-adds of every conv and linear layer with forward hooks.
    model = build_model("vgg_digits", (1, 8, 8), 10, norm="bn")
    macs = []

    def count(module: nn.Module, inputs: tuple[torch.Tensor], out: torch.Tensor) -> None:
        weight = module.weight  # type: ignore[union-attr]
        per_output = weight[0].numel()  # in_channels * kernel area, or in_features
        macs.append(out[0].numel() * per_output)

    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.register_forward_hook(count)
    model(torch.randn(2, 1, 8, 8))
    # conv 1->16 at 8x8, conv 16->32 at 4x4, linear 128->10
    assert macs == [8 * 8 * 16 * 9, 4 * 4 * 32 * 16 * 9, 10 * 128]
    assert sum(macs) < 100_000
    assert sum(p.numel() for p in model.parameters()) < 10_000


# ------------------------------------------------------------- the paper's two networks


def test_dln_has_the_papers_shapes_no_bias_and_a_norm_after_each_of_the_first_24_layers() -> None:
    # appendix A.1: k = 25 square 10 x 10 layers; the loss ||W_1...W_k x - A x||^2 has no bias
    plain = build_model("dln", (10,), 10, norm="none")
    linears = [m for m in plain.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 25
    assert all(m.weight.shape == (10, 10) and m.bias is None for m in linears)
    assert sum(p.numel() for p in plain.parameters()) == 25 * 100
    normalized = build_model("dln", (10,), 10, norm="bn")
    kinds = [type(m).__name__ for m in normalized.layers]
    assert kinds == ["Flatten"] + ["Linear", "BatchNorm1d"] * 24 + ["Linear"]


def test_glorot_init_is_uniform_with_the_normalized_bound() -> None:
    # Glorot & Bengio (2010): U(-a, a), a = sqrt(6 / (fan_in + fan_out)), variance 2/(in+out)
    layer = nn.Linear(300, 500)
    init_parameters(layer, seed=0, scale=1.0, scheme="glorot")
    w = layer.weight.detach().double()
    bound = math.sqrt(6.0 / 800)
    assert float(w.abs().max()) <= bound
    assert float(w.abs().max()) > 0.999 * bound  # 150k draws reach the edge
    assert abs(float(w.var()) / (2.0 / 800) - 1) < 0.01
    conv = nn.Conv2d(8, 16, 3)  # fans count the kernel: 72 in, 144 out
    init_parameters(conv, seed=0, scale=2.0, scheme="glorot")
    assert float(conv.weight.detach().abs().max()) <= 2.0 * math.sqrt(6.0 / 216)
    dln = build_model("dln", (10,), 10, seed=1)
    assert max(float(m.weight.abs().max()) for m in dln.linear_layers()) <= math.sqrt(6 / 20)


def _dln_loss_and_gradients(
    weights: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Closed form, column convention (x: (d, N)): L = ||P X - Y||_F^2 with P = W_k ... W_1,
    dL/dW_i = 2 (W_k ... W_{i+1})^T R (W_{i-1} ... W_1 X)^T with R = P X - Y."""
    eye = torch.eye(weights[0].shape[0], dtype=x.dtype)

    def product(ws: list[torch.Tensor]) -> torch.Tensor:
        out = eye
        for w in ws:
            out = w @ out
        return out

    residual = product(weights) @ x - y
    grads = [
        2 * product(weights[i + 1 :]).T @ residual @ (product(weights[:i]) @ x).T
        for i in range(len(weights))
    ]
    return (residual**2).sum(), grads


def test_dln_loss_and_gradient_match_the_closed_form() -> None:
    model = build_model("dln", (10,), 10, seed=3).double()
    x = torch.randn(10, 50, dtype=torch.float64)
    y = torch.randn(10, 10, dtype=torch.float64) @ x
    weights = [m.weight for m in model.linear_layers()]
    expected_loss, expected_grads = _dln_loss_and_gradients([w.detach() for w in weights], x, y)
    out = model(x.T)
    # the study's loss: torch's mean squared error, times N * d, is the paper's summed loss
    loss = nn.functional.mse_loss(out, y.T) * out.numel()
    torch.testing.assert_close(loss, expected_loss)
    grads = torch.autograd.grad(loss, weights)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_vgg10_digits_has_ten_convolutions_and_takes_glorot_init() -> None:
    model = build_model("vgg10_digits", (1, 8, 8), 10, norm="bn", init="glorot")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 10
    assert [c.out_channels for c in convs] == [16] * 4 + [32] * 6
    first = convs[0].weight.detach()
    assert float(first.abs().max()) <= math.sqrt(6.0 / (9 + 16 * 9))
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 10)


def test_init_takes_norm_layers_without_a_bias() -> None:
    import bnlab.nn as bnn

    model = nn.Sequential(nn.Linear(3, 4), bnn.BatchNorm1d(4, bias=False))
    with torch.no_grad():
        model[1].weight.fill_(3.0)
    init_parameters(model, seed=0)
    assert model[1].bias is None
    assert torch.equal(model[1].weight, torch.ones(4))
