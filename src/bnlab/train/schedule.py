"""Learning-rate schedules as pure functions of the step, so resuming needs no hidden state."""

from __future__ import annotations

import bisect
import math

import torch

from bnlab.train.config import ScheduleConfig


def lr_factor(schedule: ScheduleConfig, base_lr: float, total_steps: int, step: int) -> float:
    """The multiplier of ``base_lr`` after ``step`` updates (0-based, as torch's LambdaLR).

    A linear warm-up from 1/10 over ``warmup_steps``, then the named schedule (see
    :class:`ScheduleConfig`) counted from the end of the warm-up.
    """
    warm = schedule.warmup_steps
    if step < warm:
        return 0.1 + 0.9 * step / warm
    t = step - warm
    if schedule.name == "constant":
        return 1.0
    if schedule.name == "step":
        return float(schedule.gamma ** (t // schedule.step_size))
    if schedule.name == "multistep":
        passed = bisect.bisect_right(sorted(schedule.milestones), step)
        return float(schedule.gamma**passed)
    if schedule.name == "exponential":
        return float(schedule.gamma**t)
    if schedule.name == "cosine":
        span = max(1, total_steps - warm)
        floor = schedule.min_lr / base_lr
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(t, span) / span))
    raise ValueError(f"unknown schedule {schedule.name!r}")


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: ScheduleConfig, base_lr: float, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR following :func:`lr_factor`; its state_dict is just the step count."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(schedule, base_lr, total_steps, step)
    )
