"""Teacher encoder wrappers (open_clip, timm, segment_anything) behind one contract (see base.py).

    from distill.encoders import build_encoder
    enc = build_encoder("timm", model_name="toy:dino").freeze()
    out = enc(images)   # EncoderOutput(summary [B,C] | None, dense [B,C,h,w])
"""

from __future__ import annotations

from distill.encoders.base import Encoder, EncoderOutput, check_images
from distill.encoders.clip import OpenClipEncoder
from distill.encoders.sam import SAM_VARIANTS, SamEncoder, build_sam
from distill.encoders.timm_vit import TimmEncoder

ENCODERS: dict[str, type[Encoder]] = {
    "open_clip": OpenClipEncoder,
    "timm": TimmEncoder,
    "sam": SamEncoder,
}


def build_encoder(kind: str, **kwargs) -> Encoder:
    """Instantiate ENCODERS[kind](**kwargs); kind is 'open_clip', 'timm' or 'sam'."""
    if kind not in ENCODERS:
        raise ValueError(f"Unknown encoder kind '{kind}'. Choose one of {sorted(ENCODERS)}.")
    return ENCODERS[kind](**kwargs)


__all__ = [
    "ENCODERS",
    "SAM_VARIANTS",
    "Encoder",
    "EncoderOutput",
    "OpenClipEncoder",
    "SamEncoder",
    "TimmEncoder",
    "build_encoder",
    "build_sam",
    "check_images",
]
