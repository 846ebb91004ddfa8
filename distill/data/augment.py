"""Per-image augmentations, applied once so that the student and every teacher see the same pixels.

    train_tf = train_transform(image_size=224, min_scale=0.35, hflip=True)   # PIL -> [3, S, S] in [0, 1]
    val_tf = eval_transform(image_size=224)
"""

from __future__ import annotations

from typing import Callable

import torch
from PIL import Image
from torchvision import transforms as T


def train_transform(image_size: int, min_scale: float = 0.35, hflip: bool = True) -> Callable[[Image.Image], torch.Tensor]:
    """Random resized crop to a square `image_size`, optional horizontal flip, to a [0, 1] tensor."""
    steps: list = [T.RandomResizedCrop(image_size, scale=(min_scale, 1.0), interpolation=T.InterpolationMode.BICUBIC)]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    steps.append(T.ToTensor())
    return T.Compose(steps)


def eval_transform(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """Resize the short side to `image_size`, center crop a square, to a [0, 1] tensor."""
    return T.Compose(
        [T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size), T.ToTensor()]
    )
