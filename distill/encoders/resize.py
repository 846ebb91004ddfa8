"""Batched eval transforms on [B, C, H, W] tensors in [0, 1]: torchvision.transforms.v2.functional plus the
one thing it lacks.

torchvision resizes float tensors with torch's antialiased interpolation (an approximation of PIL), sizes
and crop offsets exactly as its PIL pipeline does (short side, long side truncated; centre-crop offsets
rounded). What it does not do for float tensors is PIL's clamp of bicubic overshoot (PIL writes uint8),
so `resize` clips bicubic output to [0, 1] (tests/test_resize.py compares with timm's and open_clip's
own PIL transforms).

    resize(images, (224, 224), "bicubic")     # squash to a size
    resize_shortest(images, 224, "bicubic")   # torchvision Resize(224): short side 224
    center_crop(images, (224, 224))           # torchvision CenterCrop (refuses to pad)
    normalize(images, mean, std)              # (images - mean) / std per channel; THE input normalization
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

_MODES = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR, "nearest": InterpolationMode.NEAREST}


def interpolation_mode(name: str) -> InterpolationMode:
    """torchvision mode for a library interpolation name; timm/open_clip 'random', 'lanczos', 'box', ... fall
    back to bicubic (their eval default)."""
    return _MODES.get(name, InterpolationMode.BICUBIC)


def _resize(images: torch.Tensor, size: list[int], interpolation: str) -> torch.Tensor:
    mode = interpolation_mode(interpolation)
    resized = TF.resize(images, size, interpolation=mode, antialias=True)
    if resized is images or mode != InterpolationMode.BICUBIC:
        return resized
    return resized.clamp(0.0, 1.0)  # PIL clips bicubic overshoot (its output is uint8)


def resize(images: torch.Tensor, size: Sequence[int], interpolation: str) -> torch.Tensor:
    """Resize [B, C, H, W] to `size` (h, w), antialiased like PIL; identity when already that size."""
    return _resize(images, [int(size[0]), int(size[1])], interpolation)


def resize_shortest(images: torch.Tensor, shortest: int, interpolation: str) -> torch.Tensor:
    """torchvision Resize(shortest) on a batch: short side = `shortest`, long side scaled and truncated."""
    return _resize(images, [int(shortest)], interpolation)


def center_crop(images: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """torchvision CenterCrop(size) on a batch; images smaller than `size` are an error (torchvision would pad)."""
    height, width = images.shape[-2:]
    if size[0] > height or size[1] > width:
        raise ValueError(f"center_crop: cannot crop {tuple(size)} from images of size {(height, width)}.")
    return TF.center_crop(images, [int(size[0]), int(size[1])])


def resize_center_crop(images: torch.Tensor, size: int, interpolation: str = "bicubic") -> torch.Tensor:
    """Short side to `size`, then the central size x size square (the eval transform of CLIP-style models)."""
    return center_crop(resize_shortest(images, size, interpolation), (size, size))


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(images - mean) / std per channel; mean/std are 3-sequences (floats or a tensor)."""
    return TF.normalize(images, mean=[float(m) for m in mean], std=[float(s) for s in std])
