"""VGG-style CNN: stages of (conv 3x3 -> norm -> ReLU) x k followed by a 2x2 max-pool.

Simonyan & Zisserman (2015); Santurkar et al. (2018) train the VGG-16 layout on CIFAR-10, with
and without BatchNorm after each convolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from bnlab.models.blocks import seeded_norm
from bnlab.models.init import init_parameters

# preset -> (widths per stage, convolutions per stage)
VGG_PRESETS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "vgg16": ((64, 128, 256, 512, 512), (2, 2, 3, 3, 3)),
    "vgg11": ((64, 128, 256, 512, 512), (1, 1, 2, 2, 2)),
    "vgg_digits": ((16, 32), (1, 1)),
    # ten 3x3 convolutions in three stages (8x8 -> 4x4 -> 2x2 -> 1x1): the study's VGG on digits,
    # deep enough to have the paper's layers 5 and 10 (its CIFAR-10 VGG has 13)
    "vgg10_digits": ((16, 32, 32), (4, 3, 3)),
}


class VGG(nn.Module):
    """Input (N, C, H, W) -> logits (N, num_outputs).

    ``widths[i]`` channels in stage i, ``convs_per_stage`` convolutions each (an int for all
    stages); a stage halves H and W while they are at least 2. ``norm`` is a kind of
    ``bnlab.nn.NORM_KINDS`` inserted after every convolution ("none" for the plain network).
    ``init``: a scheme of :func:`init_parameters` ("glorot" is the paper's).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_outputs: int,
        widths: Sequence[int] = VGG_PRESETS["vgg_digits"][0],
        convs_per_stage: int | Sequence[int] = 1,
        norm: str = "bn",
        norm_options: dict[str, Any] | None = None,
        init_scale: float = 1.0,
        seed: int = 0,
        init: str = "kaiming",
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"VGG expects (C, H, W) inputs, got input_shape {tuple(input_shape)}")
        counts = (
            [convs_per_stage] * len(widths)
            if isinstance(convs_per_stage, int)
            else list(convs_per_stage)
        )
        if len(counts) != len(widths) or not widths or min(counts) < 1 or min(widths) < 1:
            raise ValueError(
                f"VGG needs one positive conv count per stage: widths {tuple(widths)}, "
                f"convs_per_stage {convs_per_stage}"
            )
        channels, height, width = input_shape
        layers: list[nn.Module] = []
        index = 0
        for stage_width, count in zip(widths, counts, strict=True):
            for _ in range(count):
                layers.append(nn.Conv2d(channels, stage_width, 3, padding=1))
                layers.append(seeded_norm(norm, stage_width, 2, seed, index, norm_options or {}))
                layers.append(nn.ReLU())
                channels = stage_width
                index += 1
            if min(height, width) >= 2:
                layers.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(channels * height * width, num_outputs)
        )
        init_parameters(self, seed, init_scale, init)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.classifier(self.features(x))
        return out
