"""The crops a cache stores: drawn once per image like the training augmentation, applied identically at
cache time (teachers) and at training time (student).

A view is (top, left, height, width, flip) in the pixels of the decoded image; `apply_view` does what
`distill.data.augment.train_transform` does with the same parameters (torchvision's resized_crop with
bicubic antialiased resize to the square student size, then an optional horizontal flip, to [0, 1]).
"""

from __future__ import annotations

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F

View = tuple[int, int, int, int, bool]


def draw_view(image: Image.Image, min_scale: float, hflip: bool) -> View:
    """One random-resized-crop box (torchvision's sampling, area scale in [min_scale, 1]) and flip."""
    top, left, height, width = T.RandomResizedCrop.get_params(image, scale=(min_scale, 1.0), ratio=(3 / 4, 4 / 3))
    flip = bool(hflip and torch.rand(1).item() < 0.5)
    return int(top), int(left), int(height), int(width), flip


def apply_view(image: Image.Image, view: View, size: int) -> torch.Tensor:
    """The [3, size, size] tensor in [0, 1] the student and the teachers see for `view` of `image`."""
    top, left, height, width, flip = view
    crop = F.resized_crop(image, top, left, height, width, [size, size], T.InterpolationMode.BICUBIC, antialias=True)
    if flip:
        crop = F.hflip(crop)
    return F.to_tensor(crop)
