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
        precision: auto        # fp32 (default) | bf16 | auto: bf16 autocast only where measured faster (distill/common/precision.py)
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch
from torch import nn

from distill.encoders.base import Encoder, EncoderOutput
from distill.common.precision import MIN_SPEEDUP, TEACHER_PRECISIONS, teacher_autocast_dtype


class Teacher(nn.Module):
    """A frozen teacher encoder with its loss weights.

    Args:
        name: short unique name used in logs, adaptor keys and the export (e.g. ``clip``).
        encoder: the encoder wrapper (it owns the teacher's preprocessing and resolution).
        summary_weight: weight of the summary (CLS / embedding) loss; ignored if the teacher has no summary.
        dense_weight: weight of the dense feature loss.
        precision: numeric precision of the teacher's forward pass: ``fp32``, ``bf16``, or ``auto`` (bf16
            autocast on CUDA with bf16 support; on CPU bf16 only where a measured ViT block runs faster than
            fp32, see distill/common/precision.py: the cheapest precision for this machine, but machine-dependent,
            so a run resumed or repeated in another process may measure differently; hence not the default).
            Targets are returned in fp32 either way.
    """

    def __init__(self, name: str, encoder: Encoder, summary_weight: float = 1.0, dense_weight: float = 1.0,
                 precision: str = "fp32") -> None:
        super().__init__()
        if not name.isidentifier():
            raise ValueError(f"Teacher name {name!r} must be a plain identifier such as 'clip' or 'dino_v2'.")
        if precision not in TEACHER_PRECISIONS:
            raise ValueError(f"Teacher '{name}': precision must be one of {TEACHER_PRECISIONS}, got {precision!r}.")
        self.precision = precision
        self.name = name
        self.encoder = encoder.freeze()
        self.summary_weight = summary_weight
        self.dense_weight = dense_weight

    @property
    def has_summary(self) -> bool:
        return self.encoder.summary_dim is not None

    def autocast(self, device: torch.device, images: torch.Tensor | None = None) -> contextlib.AbstractContextManager:
        """The teacher's precision on `device`; fp32 also switches off an enclosing autocast (bf16-mixed student)."""
        if device.type not in ("cpu", "cuda"):
            return contextlib.nullcontext()
        dtype = teacher_autocast_dtype(self.precision, device)
        if dtype is not None and self.precision == "auto" and device.type == "cpu":
            dtype = self._checked_on_cpu(images if images is not None else torch.rand(2, 3, *self.encoder.input_size))
        return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)

    def _checked_on_cpu(self, image: torch.Tensor) -> torch.dtype | None:
        """`auto` on CPU after the probe favoured bf16: time this teacher itself on the first batch in fp32 and
        in bf16 (best of 2 each, once per teacher) and keep bf16 only if it is faster here too. A model can run
        far slower under CPU bf16 autocast than the probe block (open_clip's nn.MultiheadAttention did, 3-15x,
        until distill/encoders/mha_layout.py; other third-party code may still), so the real batch is timed."""
        if getattr(self, "_cpu_dtype", "unset") == "unset":
            best = {}
            for dtype in (None, torch.bfloat16, None, torch.bfloat16):
                start = time.perf_counter()
                with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
                    self.encoder(image)
                best[dtype] = min(best.get(dtype, float("inf")), time.perf_counter() - start)
            self._cpu_dtype = torch.bfloat16 if best[torch.bfloat16] * MIN_SPEEDUP <= best[None] else None
            logging.getLogger(__name__).warning(
                f"teacher '{self.name}' precision auto: {'bf16' if self._cpu_dtype else 'fp32'} "
                f"(batch of {len(image)}: fp32 {best[None]:.3f} s, bf16 {best[torch.bfloat16]:.3f} s)")
        return self._cpu_dtype

    def targets(self, images: torch.Tensor) -> EncoderOutput:
        """Teacher features (fp32) for images in [0, 1], computed under inference_mode in the teacher's precision."""
        with torch.inference_mode(), self.autocast(images.device, images):
            out = self.encoder(images)
        # Clone out of inference mode so the losses can save the targets for backward (float() of an
        # fp32 tensor is the tensor itself, so the clone is needed in fp32 too).
        summary = out.summary.float().clone() if out.summary is not None else None
        return EncoderOutput(summary=summary, dense=out.dense.float().clone())
