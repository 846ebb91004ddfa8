"""Cost of a vision tower: parameters, GFLOPs per image (torch.utils.flop_counter) and measured
milliseconds per image.

    cost = tower_cost(tower, image_size=64)   # {"tower_params_m": ..., "gflops_per_image": ..., "ms_per_image": ...,
                                              #  "fusion_params_m": ..., "fusion_gflops_per_image": ...}

The tower's totals include its fusion module (mllm/fusion.py); `fusion_*` give the fusion's own share (the part
that trains, and the only tower part a cached-feature run pays for).

FLOPs convention (torch's counter): 2 x multiply-accumulates of the matrix products and convolutions
(linear / matmul / bmm / conv / attention QK^T and attention x V); norms, softmax, activations and adds
are not counted. The count runs with the math attention path and without nn.MultiheadAttention's
fused inference fast path (`exact_flop_context`): torch's counter does not see the fused fast-path op
(open_clip's towers) nor CPU flash attention (`F.scaled_dot_product_attention` in timm), so without it
an open_clip ViT-B/16 counts 22.5 instead of 35.1 GFLOP. tests/test_cost.py checks it against hand counts.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def count_params(module: nn.Module) -> int:
    """All parameters of `module` (trainable or frozen)."""
    return sum(p.numel() for p in module.parameters())


@contextlib.contextmanager
def exact_flop_context() -> Iterator[None]:
    """Attention as plain matmuls the flop counter sees: SDPA's math backend, no fused MHA fast path."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


@contextlib.contextmanager
def without_grad(module: nn.Module) -> Iterator[None]:
    """Every parameter of `module` with requires_grad off, restored after: torch's flop counter (its module
    tracker) fails on trainable parameters (a fusion's learned queries) in no-grad / inference mode."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@torch.inference_mode()
def count_flops(module: nn.Module, *inputs: torch.Tensor) -> tuple[int, dict[str, int]]:
    """(total FLOPs, FLOPs per aten op) of one forward pass `module(*inputs)` under `exact_flop_context`."""
    with exact_flop_context(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    per_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), per_op


def gflops_per_image(tower: nn.Module, images: torch.Tensor) -> float:
    """FLOPs of one forward pass divided by the batch size, in GFLOPs (a multiply-add counts as 2;
    attention counted through the math path, see the module docstring)."""
    total, _ = count_flops(tower, images)
    return total / len(images) / 1e9


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
    """Parameters (millions), GFLOPs per image and ms per image of `tower` on random [0, 1] images, and the
    parameters and GFLOPs of its fusion module alone (0 for a tower without one)."""
    was_training = tower.training
    tower.eval()
    images = torch.rand(batch_size, 3, image_size, image_size)
    stats = getattr(tower, "token_stats", None)
    saved = None if stats is None else {k: v.clone() for k, v in stats.state_dict().items()}
    if getattr(tower, "needs_calibration", False):  # placeholder statistics: the cost does not depend on their values
        with torch.inference_mode():
            features = tower.features(images)
        tower.calibrate([[f.clone() for f in features]])
    try:
        with without_grad(tower):
            cost = {
                "tower_params_m": count_params(tower) / 1e6,
                "gflops_per_image": gflops_per_image(tower, images),
                "ms_per_image": ms_per_image(tower, images, repeats=repeats),
                "fusion_params_m": 0.0,
                "fusion_gflops_per_image": 0.0,
            }
            fusion = getattr(tower, "fusion", None)
            if fusion is not None:
                with torch.inference_mode():
                    features = tower.features(images)
                cost["fusion_params_m"] = count_params(fusion) / 1e6
                cost["fusion_gflops_per_image"] = count_flops(tower.fuse, features)[0] / batch_size / 1e9
        return cost
    finally:
        tower.train(was_training)
        if saved is not None:  # the tower's own (possibly unmeasured) statistics back
            stats.load_state_dict(saved)
