"""Image preprocessing as LLaVA-1.5: CLIPImageProcessor's short-side resize + centre crop, and expand2square with
the processor mean (tests/test_llava15_images.py)."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import to_tensor

from mllm.data.encode import CLIP_PAD_COLOR, SampleEncoder, image_to_tensor

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)


def clip_processor(size: int):
    """transformers' PIL CLIPImageProcessor (the one LLaVA-1.5 used), without normalization."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                 do_normalize=False)


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("width, height", [(40, 57), (57, 40), (33, 50), (50, 33), (17, 9)])
def test_without_padding_is_clip_processor_resize_and_centre_crop(width, height):
    image = noise(width, height)
    expected = clip_processor(32)(images=image, return_tensors="pt").pixel_values[0]
    assert torch.equal(image_to_tensor(image, 32), expected)


def test_pad_uses_processor_mean_like_llava_expand2square():
    """LLaVA: expand2square(image, tuple(int(x * 255) for x in processor.image_mean)), then the processor."""
    assert CLIP_PAD_COLOR == tuple(int(x * 255) for x in OPENAI_CLIP_MEAN)
    image = Image.new("RGB", (20, 40), (250, 10, 10))  # its own mean is red, not the processor mean
    side = 40
    reference = Image.new("RGB", (side, side), CLIP_PAD_COLOR)
    reference.paste(image, ((side - 20) // 2, 0))
    expected = clip_processor(32)(images=reference, return_tensors="pt").pixel_values[0]
    padded = image_to_tensor(image, 32, pad_to_square=True)
    assert torch.equal(padded, expected)
    assert torch.allclose(padded[:, 16, 0], torch.tensor(CLIP_PAD_COLOR) / 255)  # left border = processor mean


def test_pad_color_comes_from_configuration():
    image = Image.new("RGB", (20, 40), (250, 10, 10))
    padded = image_to_tensor(image, 40, pad_to_square=True, pad_color=[0, 255, 0])
    assert torch.allclose(padded[:, 20, 0], torch.tensor([0.0, 1.0, 0.0]))
    assert torch.allclose(padded[:, 20, 20], torch.tensor([250, 10, 10]) / 255)
    encoder = SampleEncoder(None, 1, 8, 40, pad_to_square=True, pad_color=(0, 0, 255))
    assert torch.allclose(image_to_tensor(image, 40, encoder.pad_to_square, encoder.pad_color)[:, 20, 0],
                          torch.tensor([0.0, 0.0, 1.0]))


def test_square_toy_images_unchanged():
    """The toy recipes' square 64 px images: identical to the previous plain resize / to_tensor."""
    image = noise(64, 64, seed=3)
    assert torch.equal(image_to_tensor(image, 64), to_tensor(image))
    assert torch.equal(image_to_tensor(image, 64, pad_to_square=True), to_tensor(image))
    assert torch.equal(image_to_tensor(image, 32), to_tensor(image.resize((32, 32), Image.BICUBIC)))
