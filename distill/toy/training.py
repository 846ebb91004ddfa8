"""What the toy teacher trainers share: their learning-rate schedule and their optimizer step.

    schedule = toy_schedule(optimizer, steps)
    for _ in range(steps):
        optimizer_step(loss_fn(...), optimizer, schedule, max_norm=1.0)
"""

from __future__ import annotations

import torch

from distill.common.schedule import warmup_cosine


def toy_schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over the first tenth of `steps`, capped by a cosine decay that spans all `steps`."""
    return warmup_cosine(optimizer, max(steps // 10, 1), steps, warmup="cap")


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                   schedule: torch.optim.lr_scheduler.LRScheduler | None = None, max_norm: float | None = None) -> float:
    """Backward `loss`, clip the optimizer's gradients to `max_norm` (if given), step the optimizer and
    the schedule; returns the loss value."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], max_norm)
    optimizer.step()
    if schedule is not None:
        schedule.step()
    return loss.item()
