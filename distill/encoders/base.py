"""The contract every vision encoder wrapper in unitower keeps.

An encoder takes images in [0, 1] (float, [B, 3, H, W], any H and W), applies its own library's
preprocessing (resize / pad / normalize), and returns an `EncoderOutput`:

    summary: [B, C_summary] or None   (e.g. CLIP's image embedding, a ViT's CLS token)
    dense:   [B, C_dense, h, w]        (patch features as a spatial map)

Teachers are frozen with `freeze()`: no gradients, and they stay in eval() even when a parent
module calls train(). Callers run frozen encoders under `torch.inference_mode()`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class EncoderOutput:
    """Features of one batch: `summary` [B, C] (or None when the encoder has none) and `dense` [B, C, h, w]."""

    summary: torch.Tensor | None
    dense: torch.Tensor


class Encoder(nn.Module):
    """Base class of the encoder wrappers (open_clip, timm, segment_anything).

    Subclasses set `summary_dim` (None when there is no summary), `dense_dim`, `patch_size` and
    `input_size` ((H, W) the encoder runs at by default) and implement `preprocess` and `encode`.
    """

    summary_dim: int | None
    dense_dim: int
    patch_size: int
    input_size: tuple[int, int]

    def __init__(self) -> None:
        super().__init__()
        self.frozen = False

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Map images in [0, 1] of any size to exactly what the underlying model expects."""
        raise NotImplementedError

    def encode(self, pixels: torch.Tensor) -> EncoderOutput:
        """Run the model on already preprocessed pixels."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> EncoderOutput:
        check_images(images, type(self).__name__)
        return self.encode(self.preprocess(images))

    def freeze(self) -> "Encoder":
        """Stop gradients and pin eval mode (train() calls no longer change it)."""
        self.requires_grad_(False)
        self.frozen = True
        return self.train(False)

    def unfreeze(self) -> "Encoder":
        """Undo `freeze()`: gradients on, and train()/eval() change the mode again."""
        self.requires_grad_(True)
        self.frozen = False
        return self

    def train(self, mode: bool = True) -> "Encoder":
        return super().train(False if self.frozen else mode)


def check_images(images: torch.Tensor, who: str) -> None:
    """Raise a clear error unless `images` is a float [B, 3, H, W] batch."""
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(
            f"{who} expects float images of shape [B, 3, H, W] in [0, 1]; got "
            f"{tuple(images.shape)} {images.dtype}. Convert with torchvision.transforms.functional.to_tensor."
        )


def maps_at_layers(layers: list[int], num_blocks: int, who: str, run_blocks, final_norm: nn.Module) -> list[torch.Tensor]:
    """Dense maps [B, C, h, w] at each of `layers` (python block indices; -1 = the last block's tokens after
    `final_norm`, any other block without it) from ONE pass: `run_blocks(blocks)` returns the raw maps of the
    distinct blocks asked for, ascending (a library's `forward_intermediates`). ValueError (from `who`) naming a layer
    outside the `num_blocks` blocks."""
    for layer in layers:
        if not -num_blocks <= layer < num_blocks:
            raise ValueError(f"{who}: layer={layer} is outside its {num_blocks} blocks.")
    blocks = sorted({layer % num_blocks for layer in layers})
    maps = dict(zip(blocks, run_blocks(blocks)))
    last = maps.get(num_blocks - 1)
    return [final_norm(last.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous() if layer == -1
            else maps[layer % num_blocks] for layer in layers]
