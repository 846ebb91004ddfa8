"""Tensor versions of the torchvision eval transforms the teacher libraries use (resize, center crop).

torch's `interpolate(..., antialias=True)` approximates PIL resampling; sizes follow torchvision exactly:

    resize_shortest(images, 224, "bicubic")   # torchvision Resize(224): short side 224, long side int(...)
    center_crop(images, (224, 224))           # torchvision CenterCrop
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_TORCH_MODES = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest", "area": "area"}


def interpolation_mode(name: str) -> str:
    """torch interpolate mode for a library interpolation name ('bicubic', 'bilinear', ...)."""
    if name not in _TORCH_MODES:
        # timm/open_clip 'random' and 'lanczos' have no torch equivalent; bicubic is their eval fallback
        return "bicubic"
    return _TORCH_MODES[name]


def resize(images: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """Resize [B, C, H, W] to `size` (h, w), antialiased like PIL; identity when already that size."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    mode = interpolation_mode(interpolation)
    antialias = mode in ("bilinear", "bicubic")
    resized = F.interpolate(images, size=tuple(size), mode=mode, align_corners=False if antialias else None, antialias=antialias)
    return resized.clamp(0.0, 1.0) if mode == "bicubic" else resized  # PIL clips bicubic overshoot


def shortest_side_size(height: int, width: int, shortest: int) -> tuple[int, int]:
    """(h, w) after torchvision Resize(int): short side = `shortest`, long side scaled and truncated."""
    if height <= width:
        return shortest, int(shortest * width / height)
    return int(shortest * height / width), shortest


def resize_shortest(images: torch.Tensor, shortest: int, interpolation: str) -> torch.Tensor:
    """torchvision Resize(shortest) on a batch."""
    return resize(images, shortest_side_size(*images.shape[-2:], shortest), interpolation)


def center_crop(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """torchvision CenterCrop(size) on a batch (images must be at least `size`)."""
    height, width = images.shape[-2:]
    crop_h, crop_w = size
    if crop_h > height or crop_w > width:
        raise ValueError(f"center_crop: cannot crop {(crop_h, crop_w)} from images of size {(height, width)}.")
    top = int(round((height - crop_h) / 2.0))
    left = int(round((width - crop_w) / 2.0))
    return images[..., top : top + crop_h, left : left + crop_w]


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """(images - mean) / std per channel; mean/std are 3-sequences."""
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t
