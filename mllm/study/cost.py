"""Cost of a vision tower: parameters, GFLOPs per image (torch.utils.flop_counter) and measured
milliseconds per image.

    cost = tower_cost(tower, image_size=64)   # {"tower_params_m": ..., "gflops_per_image": ..., "ms_per_image": ...}
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(module: nn.Module) -> int:
    """All parameters of `module` (trainable or frozen)."""
    return sum(p.numel() for p in module.parameters())


@torch.inference_mode()
def gflops_per_image(tower: nn.Module, images: torch.Tensor) -> float:
    """FLOPs of one forward pass divided by the batch size, in GFLOPs (a multiply-add counts as 2)."""
    with FlopCounterMode(display=False) as counter:
        tower(images)
    return counter.get_total_flops() / len(images) / 1e9


@torch.inference_mode()
def ms_per_image(tower: nn.Module, images: torch.Tensor, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall-clock milliseconds per image over `repeats` timed forward passes."""
    for _ in range(warmup):
        tower(images)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        tower(images)
        times.append(time.perf_counter() - start)
    times.sort()
    return 1000.0 * times[len(times) // 2] / len(images)


def tower_cost(tower: nn.Module, image_size: int, batch_size: int = 8, repeats: int = 5) -> dict[str, float]:
    """Parameters (millions), GFLOPs per image and ms per image of `tower` on random [0, 1] images."""
    was_training = tower.training
    tower.eval()
    images = torch.rand(batch_size, 3, image_size, image_size)
    try:
        return {
            "tower_params_m": count_params(tower) / 1e6,
            "gflops_per_image": gflops_per_image(tower, images),
            "ms_per_image": ms_per_image(tower, images, repeats=repeats),
        }
    finally:
        tower.train(was_training)
