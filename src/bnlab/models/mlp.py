"""Fully connected models: MLP, deep linear network, logistic regression."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from bnlab.models.blocks import seeded_norm
from bnlab.models.init import init_parameters


def _flat_size(input_shape: Sequence[int]) -> int:
    size = 1
    for d in input_shape:
        size *= int(d)
    return size


class _Stack(nn.Module):
    """Flatten -> (Linear -> norm -> activation) per hidden width -> Linear."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_outputs: int,
        hidden: Sequence[int],
        activation: type[nn.Module] | None,
        norm: str,
        norm_options: dict[str, Any] | None,
        init_scale: float,
        seed: int,
        scheme: str,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if any(h < 1 for h in hidden):
            raise ValueError(f"hidden widths must be positive, got {tuple(hidden)}")
        layers: list[nn.Module] = [nn.Flatten()]
        features = _flat_size(input_shape)
        for index, width in enumerate(hidden):
            layers.append(nn.Linear(features, width, bias=bias))
            layers.append(seeded_norm(norm, width, 1, seed, index, norm_options or {}))
            if activation is not None:
                layers.append(activation())
            features = width
        layers.append(nn.Linear(features, num_outputs, bias=bias))
        self.layers = nn.Sequential(*layers)
        init_parameters(self, seed, init_scale, scheme)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.layers(x)
        return out


class MLP(_Stack):
    """Input (N, *input_shape) -> (N, num_outputs): ReLU layers of ``hidden`` widths, ``norm``
    after each hidden Linear (a kind of ``bnlab.nn.NORM_KINDS``)."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_outputs: int,
        hidden: Sequence[int] = (64, 64),
        norm: str = "bn",
        norm_options: dict[str, Any] | None = None,
        init_scale: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(
            input_shape,
            num_outputs,
            hidden,
            nn.ReLU,
            norm,
            norm_options,
            init_scale,
            seed,
            "kaiming",
        )


class DeepLinearNetwork(_Stack):
    """The deep linear network (DLN) of Santurkar et al. (2018, appendix A.1): x (N, d_in) ->
    W_k ... W_2 W_1 x (N, num_outputs), ``depth`` = k bias-free Linear layers and no activation,
    so the function is linear in x while the loss landscape in the weights is not.

    The paper's network: k = 25 square 10 x 10 layers (``width`` 10, inputs and outputs of 10),
    Glorot initialization (``init``, see :func:`init_parameters`). ``norm`` goes after each of the
    first k - 1 layers (the k-th layer's output is the prediction W_1...W_k x, compared with A x),
    so a normalized DLN is W_k N(W_{k-1} ... N(W_1 x)).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_outputs: int,
        depth: int = 25,
        width: int = 10,
        norm: str = "none",
        norm_options: dict[str, Any] | None = None,
        init_scale: float = 1.0,
        seed: int = 0,
        init: str = "glorot",
    ) -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        super().__init__(
            input_shape,
            num_outputs,
            [width] * (depth - 1),
            None,
            norm,
            norm_options,
            init_scale,
            seed,
            init,
            bias=False,
        )

    def linear_layers(self) -> list[nn.Linear]:
        """W_1, ..., W_k in forward order."""
        return [m for m in self.layers if isinstance(m, nn.Linear)]


class LogisticRegression(_Stack):
    """Flatten -> ``norm`` on the inputs -> Linear: multinomial logistic regression (logits)."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_outputs: int,
        norm: str = "none",
        norm_options: dict[str, Any] | None = None,
        init_scale: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(
            input_shape, num_outputs, [], None, norm, norm_options, init_scale, seed, "xavier"
        )
        features = _flat_size(input_shape)
        # Normalizing the inputs is the one place BN can act in a model without hidden layers.
        self.layers.insert(1, seeded_norm(norm, features, 1, seed, 0, norm_options or {}))
