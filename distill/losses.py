"""Distillation losses as pure functions (no state, no Lightning).

summary_cosine(pred [B,C], target [B,C])          -> mean(1 - cos)
dense_cosine_smooth_l1(pred, target, a, b)         -> a * mean(1 - cos over C) + b * smooth_l1 (means over all elements)
dense_mse(pred, target, mean, std)                 -> MSE against the channel-standardized target
resize_to_grid(dense [B,C,h,w], (H, W))            -> bilinear resize of a student map to a teacher grid
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_similarity(pred: torch.Tensor, target: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Cosine similarity along `dim`, computed in float32."""
    return F.cosine_similarity(pred.float(), target.float(), dim=dim, eps=1e-6)


def summary_cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of (1 - cosine similarity) between summary vectors [B, C]."""
    _check_same_shape(pred, target, "summary")
    return (1.0 - cosine_similarity(pred, target, dim=-1)).mean()


def dense_cosine_smooth_l1(
    pred: torch.Tensor, target: torch.Tensor, cosine_weight: float = 0.9, smooth_l1_weight: float = 0.1, beta: float = 1.0
) -> torch.Tensor:
    """a * mean over positions of (1 - cos over channels) + b * smooth-L1 (mean over all elements)."""
    _check_same_shape(pred, target, "dense")
    cos = (1.0 - cosine_similarity(pred, target, dim=1)).mean()
    l1 = F.smooth_l1_loss(pred.float(), target.float(), beta=beta)
    return cosine_weight * cos + smooth_l1_weight * l1


def dense_mse(
    pred: torch.Tensor, target: torch.Tensor, mean: torch.Tensor | None = None, std: torch.Tensor | None = None
) -> torch.Tensor:
    """MSE between `pred` and the target standardized per channel with `mean` / `std` ([C] each)."""
    _check_same_shape(pred, target, "dense")
    target = target.float()
    if mean is not None and std is not None:
        target = (target - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1).clamp_min(1e-6)
    return F.mse_loss(pred.float(), target)


def resize_to_grid(dense: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize a [B, C, h, w] map to `grid` (no-op when it already matches)."""
    if tuple(dense.shape[-2:]) == tuple(grid):
        return dense
    return F.interpolate(dense, size=tuple(grid), mode="bilinear", align_corners=False)


def _check_same_shape(pred: torch.Tensor, target: torch.Tensor, what: str) -> None:
    if pred.shape != target.shape:
        raise ValueError(
            f"{what} prediction shape {tuple(pred.shape)} != teacher target shape {tuple(target.shape)}; "
            "check the adaptor head's output width against the teacher's feature width."
        )
