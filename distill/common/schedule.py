"""The learning-rate schedule of every trainer in the project: linear warmup and cosine decay, per step.

    scheduler = warmup_cosine(optimizer, warmup_steps=100, total_steps=10_000, min_lr_ratio=0.01)
    # call scheduler.step() after every optimizer step (Lightning: interval="step")

How warmup meets the cosine (`warmup`):
    "then"  warmup over the first steps, then a cosine over the remaining ones (distillation, LLaVA);
    "cap"   a cosine over all steps, capped by the warmup ramp (toy teachers);
    "scale" a cosine over all steps, multiplied by the warmup ramp (toy LM).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

WarmupShape = Literal["then", "cap", "scale"]


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0,
                         warmup: WarmupShape = "then") -> float:
    """The multiplier of the base LR at `step` (0-based): warmup ramp (step + 1) / warmup_steps and a cosine
    from 1 down to min_lr_ratio, joined as `warmup` says (see the module docstring)."""
    if warmup == "then":
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        return _cosine(step - warmup_steps, total_steps - warmup_steps, min_lr_ratio)
    ramp = (step + 1) / max(warmup_steps, 1)
    if warmup == "cap":
        return min(ramp, _cosine(step, total_steps, min_lr_ratio))
    if warmup == "scale":  # the toy LM's expression, kept operation for operation so its weights stay bit-identical
        cosine = 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
        return min(1.0, ramp) * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)
    raise ValueError(f"warmup_cosine_factor: warmup={warmup!r} is unknown; use 'then', 'cap' or 'scale'.")


def _cosine(step: int, steps: int, min_lr_ratio: float) -> float:
    """1 at step 0, min_lr_ratio from step `steps` on, a half cosine in between."""
    progress = min(1.0, step / max(1, steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0,
                  warmup: WarmupShape = "then") -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR applying `warmup_cosine_factor` to every parameter group."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_factor(step, warmup_steps, total_steps, min_lr_ratio, warmup)
    )
