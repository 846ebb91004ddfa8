"""distill/encoders/resize.py against the libraries' own PIL pipelines (timm's and open_clip's eval transforms):
same output sizes and crop boxes exactly, pixels within PIL's antialiasing / uint8 rounding, and the bicubic
clamp (the one thing torchvision's tensor path lacks) brings the tensor path closer to PIL."""

import numpy as np
import open_clip
import pytest
import timm.data
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.functional import to_tensor

from distill.encoders import resize as R

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def smooth_image(height: int, width: int, seed: int = 0) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, max(2, height // 6), max(2, width // 6), generator=generator)
    smooth = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0]
    return Image.fromarray((smooth.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def sharp_image(height: int, width: int, seed: int = 0) -> Image.Image:
    """Black/white blocks: bicubic overshoots at every edge."""
    generator = torch.Generator().manual_seed(seed)
    blocks = (torch.rand(3, height // 4, width // 4, generator=generator) > 0.5).float()
    sharp = blocks.repeat_interleave(4, 1).repeat_interleave(4, 2)
    return Image.fromarray((sharp.permute(1, 2, 0).numpy() * 255).astype(np.uint8))


@pytest.mark.parametrize("hw", [(50, 37), (37, 50), (45, 45)])
def test_timm_eval_transform_parity(hw):
    """timm: Resize(int(32 / 0.875)) short side, CenterCrop(32), normalize."""
    image = smooth_image(*hw)
    transform = timm.data.create_transform(input_size=(3, 32, 32), interpolation="bicubic", crop_pct=0.875, mean=MEAN, std=STD)
    expected = transform(image)[None]
    got = R.normalize(R.center_crop(R.resize_shortest(to_tensor(image)[None], 36, "bicubic"), (32, 32)), MEAN, STD)
    diff = (got - expected).abs().max().item() * max(STD)  # back on the [0, 1] pixel scale
    print(f"timm {hw}: max abs pixel diff {diff:.4f}")
    assert got.shape == expected.shape == (1, 3, 32, 32)
    assert diff < 3 / 255  # a wrong size, offset or normalization is off by far more


@pytest.mark.parametrize("hw", [(50, 37), (37, 50), (31, 31)])
def test_open_clip_eval_transform_parity(hw):
    """open_clip: Resize(32) short side (bicubic), CenterCrop(32), normalize; upsampling (31 px) too."""
    image = smooth_image(*hw, seed=1)
    transform = open_clip.image_transform(32, is_train=False, mean=MEAN, std=STD)
    expected = transform(image)[None]
    got = R.normalize(R.resize_center_crop(to_tensor(image)[None], 32, "bicubic"), MEAN, STD)
    diff = (got - expected).abs().max().item() * max(STD)
    print(f"open_clip {hw}: max abs pixel diff {diff:.4f}")
    assert got.shape == expected.shape
    assert diff < 3 / 255


def test_bicubic_clamp_matches_pil_on_sharp_edges():
    image = sharp_image(48, 48)
    expected = to_tensor(image.resize((20, 20), Image.BICUBIC))[None]
    pixels = to_tensor(image)[None]
    got = R.resize(pixels, (20, 20), "bicubic")
    unclamped = F.interpolate(pixels, size=(20, 20), mode="bicubic", antialias=True, align_corners=False)
    assert unclamped.min() < -0.01 and unclamped.max() > 1.01  # the overshoot the clamp removes
    assert got.min() >= 0 and got.max() <= 1
    assert (got - expected).abs().mean() < (unclamped - expected).abs().mean()


def test_sizes_offsets_and_errors():
    images = torch.rand(2, 3, 50, 37)
    assert R.resize_shortest(images, 32, "bilinear").shape[-2:] == (43, 32)  # int(32 * 50 / 37) = 43 (truncated)
    assert R.resize(images, (50, 37), "bicubic") is images  # no-op keeps the tensor (no clamp)
    crop = R.center_crop(images, (40, 30))
    assert torch.equal(crop, images[..., 5:45, 4:34])  # offsets round((50-40)/2)=5, round((37-30)/2)=4 (3.5 -> 4)
    with pytest.raises(ValueError, match=r"cannot crop \(64, 64\)"):
        R.center_crop(images, (64, 64))
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    expected = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.equal(R.normalize(images, mean, std), expected)
    assert R.interpolation_mode("random") == R.interpolation_mode("bicubic")
