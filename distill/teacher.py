"""A teacher in a distillation run: a frozen encoder plus how it is distilled.

In YAML (one list item of `model.teachers`):

    - class_path: distill.teacher.Teacher
      init_args:
        name: clip
        summary_weight: 1.0
        dense_weight: 1.0
        encoder:
          class_path: distill.encoders.OpenClipEncoder
          init_args: {model_name: ViT-L-14-336, pretrained: /ckpts/clip.pt}
"""

from __future__ import annotations

import torch
from torch import nn

from distill.encoders.base import Encoder, EncoderOutput


class Teacher(nn.Module):
    """A frozen teacher encoder with its loss weights.

    Args:
        name: short unique name used in logs, adaptor keys and the export (e.g. ``clip``).
        encoder: the encoder wrapper (it owns the teacher's preprocessing and resolution).
        summary_weight: weight of the summary (CLS / embedding) loss; ignored if the teacher has no summary.
        dense_weight: weight of the dense feature loss.
    """

    def __init__(self, name: str, encoder: Encoder, summary_weight: float = 1.0, dense_weight: float = 1.0) -> None:
        super().__init__()
        if not name.isidentifier():
            raise ValueError(f"Teacher name {name!r} must be a plain identifier such as 'clip' or 'dino_v2'.")
        self.name = name
        self.encoder = encoder.freeze()
        self.summary_weight = summary_weight
        self.dense_weight = dense_weight

    @property
    def has_summary(self) -> bool:
        return self.encoder.summary_dim is not None

    def targets(self, images: torch.Tensor) -> EncoderOutput:
        """Teacher features for images in [0, 1]; bf16 autocast on CUDA."""
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=images.is_cuda):
            out = self.encoder(images)
        # Clone out of inference mode so the losses can save the targets for backward.
        summary = out.summary.float().clone() if out.summary is not None else None
        return EncoderOutput(summary=summary, dense=out.dense.float().clone())
