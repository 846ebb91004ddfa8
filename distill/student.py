"""The student: any timm ViT with one summary token per summary-bearing teacher.

The summary tokens are timm's own prefix tokens (the class token followed by register tokens), so
the trained backbone is a plain timm VisionTransformer that `timm.create_model('local-dir:DIR')`
rebuilds from an export without this project. Token layout: prefix token i (i < len(summary_names))
is the summary token of teacher summary_names[i]; the remaining prefix tokens are registers.

    student = StudentViT("vit_small_patch16_224", summary_names=["clip", "dino"], num_registers=4)
    out = student(images)            # images in [0, 1], any size divisible by the patch size
    out.summary["clip"]              # [B, C]
    out.dense                        # [B, C, h, w]
"""

from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
from torch import nn

from distill.encoders.base import check_images


@dataclass
class StudentOutput:
    """Per-teacher summary tokens {name: [B, C]} and the dense patch map [B, C, h, w]."""

    summary: dict[str, torch.Tensor]
    dense: torch.Tensor


class StudentViT(nn.Module):
    """A timm ViT student with per-teacher summary tokens and dynamic image size.

    Args:
        model_name: any timm ViT architecture name (e.g. ``vit_base_patch16_224``).
        summary_names: the teachers that have a summary (CLS / image embedding), in order; each gets
            its own prefix token. Must match the teachers configured in the distillation module.
        num_registers: extra register tokens (Darcet et al.) beyond the summary tokens.
        img_size: the resolution the position embedding is created for; other sizes are interpolated.
        pretrained: start from timm's pretrained weights for ``model_name`` (needs a download or a
            ``checkpoint``).
        checkpoint: local weights file for ``model_name`` (loaded through timm's pretrained_cfg_overlay).
        mean: per-channel normalization mean applied to [0, 1] inputs.
        std: per-channel normalization std applied to [0, 1] inputs.
        model_args: extra keyword arguments for ``timm.create_model`` (e.g. ``embed_dim``, ``depth``,
            ``num_heads``, ``patch_size`` for a custom small ViT).
    """

    def __init__(
        self,
        model_name: str = "vit_base_patch16_224",
        summary_names: list[str] | None = None,
        num_registers: int = 0,
        img_size: int = 224,
        pretrained: bool = False,
        checkpoint: str | None = None,
        mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
        std: tuple[float, float, float] = (0.229, 0.224, 0.225),
        model_args: dict | None = None,
    ) -> None:
        super().__init__()
        self.summary_names = list(summary_names or [])
        self.num_registers = num_registers
        self.model_name = model_name
        num_prefix = max(1, len(self.summary_names) + num_registers)
        # Everything needed to rebuild the backbone with plain timm (written into the export).
        self.model_args = dict(model_args or {})
        self.model_args.update(
            img_size=img_size,
            class_token=True,
            reg_tokens=num_prefix - 1,
            dynamic_img_size=True,
            num_classes=0,
        )
        if checkpoint is not None:
            from distill.encoders.paths import resolve_path

            checkpoint = str(resolve_path(checkpoint))
        overlay = dict(file=checkpoint) if checkpoint else None
        try:
            self.model = timm.create_model(
                model_name,
                pretrained=pretrained or checkpoint is not None,
                pretrained_cfg_overlay=overlay,
                **self.model_args,
            )
        except RuntimeError as err:
            if "Unknown model" in str(err):
                close = timm.list_models(f"*{model_name.split('_')[0]}*")[:10]
                raise ValueError(f"Unknown timm student model {model_name!r}; similar names: {close}") from err
            raise
        if not hasattr(self.model, "forward_intermediates") or not hasattr(self.model, "num_prefix_tokens"):
            raise ValueError(f"Student {model_name!r} is not a timm ViT with forward_intermediates/num_prefix_tokens.")
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.embed_dim: int = self.model.embed_dim
        self.patch_size: int = self.model.patch_embed.patch_size[0]
        self.img_size = img_size

    def forward(self, images: torch.Tensor) -> StudentOutput:
        check_images(images, "StudentViT")
        if images.shape[-1] % self.patch_size or images.shape[-2] % self.patch_size:
            raise ValueError(
                f"StudentViT input {tuple(images.shape[-2:])} is not divisible by patch size {self.patch_size}; "
                "resize or crop the images (the data module's image_size) to a multiple of it."
            )
        tokens = self.model.forward_features((images - self.mean) / self.std)
        return self.split_tokens(tokens, images.shape[-2:])

    def split_tokens(self, tokens: torch.Tensor, image_hw: tuple[int, int]) -> StudentOutput:
        """Split final tokens [B, prefix + h*w, C] into summary tokens and a dense map."""
        h, w = image_hw[0] // self.patch_size, image_hw[1] // self.patch_size
        prefix = self.model.num_prefix_tokens
        summary = {name: tokens[:, i] for i, name in enumerate(self.summary_names)}
        dense = tokens[:, prefix:].transpose(1, 2).reshape(tokens.shape[0], -1, h, w)
        return StudentOutput(summary=summary, dense=dense)
