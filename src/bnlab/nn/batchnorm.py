"""Batch Normalization modules, drop-in for ``torch.nn.BatchNorm1d/2d/3d``.

Every variant in ``bnlab.nn`` derives from :class:`BatchNorm`, which holds the parameters and
buffers (the same names as torch.nn, so state_dicts load both ways), resolves the momentum, checks
the input and calls one function of ``bnlab.functional``. A variant overrides :meth:`_normalize`
(and, for lp, the name of its scale buffer) or :meth:`_noise`, nothing else.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from bnlab import functional as F
from bnlab.functional import ops
from bnlab.functional.cross_rank import ProcessGroup
from bnlab.functional.kernels import native


def _count_batch(counter: Tensor) -> None:
    """``counter.add_(1)``: through the native glue where it is loaded (a plain CPU counter in
    0.15 us against 1.5-3 us for the torch call, the same effect, version counter included;
    any other counter through ``add_`` there), else (and under torch.compile) through torch."""
    glue = None if torch.compiler.is_compiling() else native.loaded()
    if glue is not None:
        glue.count_batch(counter)
    else:
        counter.add_(1)


class BatchNorm(nn.Module):
    """Batch Normalization over the channel axis 1 of an (N, C, *) input of any rank.

    Args mirror ``torch.nn.BatchNorm2d``: ``num_features`` (C), ``eps``, ``momentum`` (``None``
    for a cumulative moving average), ``affine``, ``track_running_stats``, ``device``, ``dtype``.
    ``bias=False`` (keyword, with ``affine``): a learnable weight without a bias, as torch 2.13.
    ``process_group`` and ``sync_stats``: when torch.distributed is initialized, training
    statistics are computed over all ranks of ``process_group`` (default: the world), like
    ``torch.nn.SyncBatchNorm``; ``sync_stats=False`` keeps them per process.
    """

    _expected_dims: ClassVar[tuple[int, ...] | None] = None
    _shape_text: ClassVar[str] = "(N, C, *)"
    _scale_buffer: ClassVar[str] = "running_var"
    _version = 2

    num_batches_tracked: Tensor | None
    running_mean: Tensor | None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        process_group: ProcessGroup | None = None,
        sync_stats: bool = True,
    ) -> None:
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features must be a positive integer, got {num_features}")
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] or None, got {momentum}")
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.process_group = process_group
        self.sync_stats = sync_stats
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer(self._scale_buffer, torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, device=device),
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer(self._scale_buffer, None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    @property
    def running_scale_buffer(self) -> Tensor | None:
        """The buffer the variant tracks next to ``running_mean`` (running_var or running_scale)."""
        buffer: Tensor | None = getattr(self, self._scale_buffer)
        return buffer

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            assert self.running_mean is not None and self.num_batches_tracked is not None
            self.running_mean.zero_()
            scale = self.running_scale_buffer
            assert scale is not None
            scale.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, bias={self.bias is not None}, "
            f"track_running_stats={self.track_running_stats}"
        )

    def _check_input(self, input: Tensor) -> None:
        name = type(self).__name__
        if self._expected_dims is not None and input.dim() not in self._expected_dims:
            dims = " or ".join(f"{d}-D" for d in self._expected_dims)
            raise ValueError(
                f"{name} expects a {dims} input {self._shape_text}, got a {input.dim()}-D input "
                f"of shape {tuple(input.shape)}"
            )
        if input.dim() < 2:
            raise ValueError(
                f"{name} expects an input of shape (N, C, *), got {tuple(input.shape)}"
            )
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{name} expects {self.num_features} channels, got {input.shape[1]} "
                f"(input shape {tuple(input.shape)})"
            )
        if not input.is_floating_point():
            raise TypeError(f"{name} expects a floating-point input, got dtype {input.dtype}")

    def _momentum_factor(self) -> float:
        """torch.nn's rule: count the batch, then use momentum or 1 / batches (cumulative)."""
        if not (
            self.training and self.track_running_stats and self.num_batches_tracked is not None
        ):
            return 0.0 if self.momentum is None else self.momentum
        _count_batch(self.num_batches_tracked)
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        if not self.training:
            mean, scale = self.running_mean, self.running_scale_buffer
            if mean is not None and scale is not None:
                # Eval with running statistics is the same for every variant: the short way.
                is_var = self._scale_buffer == "running_var"
                return F.eval_with_running(
                    input, mean, scale, self.weight, self.bias, self.eps, is_var,
                    type(self).__name__,
                )  # fmt: skip
        momentum = self._momentum_factor()
        use_batch_stats = self.training or self.running_mean is None
        if use_batch_stats and input.numel() == 0:
            # torch.nn's rule: an empty batch has no statistics to normalize with or to track;
            # the output is empty, still in the graph (parameter gradients are zeros).
            return ops.affine(input.clone(), self.weight, self.bias)
        track = not self.training or self.track_running_stats
        running_mean = self.running_mean if track else None
        running_scale = self.running_scale_buffer if track else None
        return self._normalize(input, running_mean, running_scale, use_batch_stats, momentum)

    def _normalize(
        self,
        input: Tensor,
        running_mean: Tensor | None,
        running_scale: Tensor | None,
        training: bool,
        momentum: float,
    ) -> Tensor:
        return F.batch_norm(
            input,
            running_mean,
            running_scale,
            self.weight,
            self.bias,
            training,
            momentum,
            self.eps,
            self.process_group,
            self.sync_stats,
            noise=self._noise(input) if self.training else None,
        )

    def _noise(self, input: Tensor) -> F.NoiseDraw | None:
        """This training step's output noise (None: none; noisy BatchNorm draws some)."""
        return None

    def _upgrade_state_dict(
        self, state_dict: dict[str, Any], prefix: str, version: int | None
    ) -> None:
        """Fill in what older state_dicts lack, in place, before they load."""
        # Like torch.nn: state_dicts older than version 2 carry no num_batches_tracked.
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        self._upgrade_state_dict(state_dict, prefix, local_metadata.get("version", None))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class _Dims1d:
    _expected_dims: ClassVar[tuple[int, ...] | None] = (2, 3)
    _shape_text: ClassVar[str] = "(N, C) or (N, C, L)"


class _Dims2d:
    _expected_dims: ClassVar[tuple[int, ...] | None] = (4,)
    _shape_text: ClassVar[str] = "(N, C, H, W)"


class _Dims3d:
    _expected_dims: ClassVar[tuple[int, ...] | None] = (5,)
    _shape_text: ClassVar[str] = "(N, C, D, H, W)"


class BatchNorm1d(_Dims1d, BatchNorm):
    """Drop-in for ``torch.nn.BatchNorm1d``: input (N, C) or (N, C, L)."""


class BatchNorm2d(_Dims2d, BatchNorm):
    """Drop-in for ``torch.nn.BatchNorm2d``: input (N, C, H, W), NCHW or channels-last."""


class BatchNorm3d(_Dims3d, BatchNorm):
    """Drop-in for ``torch.nn.BatchNorm3d``: input (N, C, D, H, W)."""
