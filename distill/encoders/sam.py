"""SAM image encoder (segment_anything) as a unitower teacher, plus `build_sam` for full Sam models.

    sam = build_sam("tiny")                          # random tiny Sam (toy world, tests)
    sam = build_sam("vit_b", "sam_vit_b_01ec64.pth") # official architecture + official checkpoint
    enc = SamEncoder("vit_b", checkpoint="sam_vit_b_01ec64.pth").freeze()
    out = enc(images)   # images [B,3,H,W] in [0,1]; out.summary None, out.dense [B,256,h,w]

Preprocessing follows SamPredictor.set_image: resize the longest side to img_size (bilinear, as
ResizeLongestSide does via PIL), normalize with Sam.pixel_mean/std on the 0-255 scale, pad bottom/right.
The dense map is cropped to the patches that cover the unpadded image.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.utils.transforms import ResizeLongestSide

from distill.encoders.base import Encoder, EncoderOutput
from distill.encoders.resize import normalize
from distill.common.io import load_weights
from distill.common.names import resolve_path
from distill.common.state_dicts import check_state_dict


def _build_tiny_sam() -> Sam:
    """A small SAM (64 px, patch 8) with the official layout: toy world and tests."""
    image_size, patch_size, prompt_dim = 64, 8, 64
    grid = image_size // patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=image_size,
            patch_size=patch_size,
            embed_dim=96,
            depth=4,
            num_heads=3,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            qkv_bias=True,
            use_rel_pos=True,
            window_size=4,
            global_attn_indexes=(1, 3),
            out_chans=prompt_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_dim, mlp_dim=256, num_heads=2),
            transformer_dim=prompt_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=64,
        ),
    )


# Each builder returns a randomly initialised Sam; weights are loaded by build_sam (weights_only).
SAM_VARIANTS: dict[str, Callable[[], Sam]] = {
    "vit_b": lambda: sam_model_registry["vit_b"](checkpoint=None),
    "vit_l": lambda: sam_model_registry["vit_l"](checkpoint=None),
    "vit_h": lambda: sam_model_registry["vit_h"](checkpoint=None),
    "tiny": _build_tiny_sam,
}


def build_sam(variant: str, checkpoint: str | None = None) -> Sam:
    """Build a full segment_anything Sam of `variant` (see SAM_VARIANTS), optionally loading a
    plain state-dict checkpoint (.pth like the official files, or .safetensors; "toy:NAME" allowed).
    Returned in eval mode."""
    if variant not in SAM_VARIANTS:
        raise ValueError(f"Unknown SAM variant '{variant}'. Choose one of {sorted(SAM_VARIANTS)}.")
    checkpoint = resolve_path(checkpoint)
    what = f"SAM variant '{variant}'"
    state = load_weights(checkpoint, what) if checkpoint is not None else None  # fail before building
    sam = SAM_VARIANTS[variant]()
    if state is not None:
        check_state_dict(sam.state_dict(), state, checkpoint, what)  # names missing / unexpected / misshapen keys
        sam.load_state_dict(state)
    return sam.eval()


CPU_CHUNK_TOKENS = 4096  # patch tokens per SAM image-encoder call on CPU (one 1024 px image, patch 16)


def default_chunk_size(tokens_per_image: int, batch: int, device_type: str) -> int:
    """Images per SAM image-encoder call when `chunk_size` is None (see SamEncoder)."""
    if device_type != "cpu":
        return max(1, batch)
    return max(1, CPU_CHUNK_TOKENS // max(1, tokens_per_image))


class SamEncoder(Encoder):
    """Frozen-teacher wrapper of SAM's image encoder.

    Args:
        variant: one of SAM_VARIANTS ('vit_b', 'vit_l', 'vit_h' official; 'tiny' for tests / toy world).
        checkpoint: plain state-dict file of the full Sam (official .pth), or "toy:sam"; None = random init.
        layer: -1 = neck output (dense_dim = out_chans); any other int = output of that image-encoder
            block (python index into the block list, -2 = penultimate), channels = embed_dim, before the neck.
        chunk_size: images per image-encoder call; a batch is run in chunks of this size so the per-image
            cost does not grow with the batch (SAM's global attention maps over 64x64 tokens are 0.8 GB per
            image and block in fp32). None = on CPU as many images as fit in CPU_CHUNK_TOKENS patch tokens
            (1 image at SAM's 1024 px, whole toy batches at 64 px, where batching is faster), the whole
            batch on other devices.
    """

    def __init__(self, variant: str = "vit_b", checkpoint: str | None = None, layer: int = -1,
                 chunk_size: int | None = None) -> None:
        super().__init__()
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"SamEncoder: chunk_size must be >= 1 (or null for the per-device default), got {chunk_size}.")
        self.chunk_size = chunk_size
        sam = build_sam(variant, checkpoint)
        self.image_encoder: ImageEncoderViT = sam.image_encoder
        self._sam = (sam,)  # a tuple, not a submodule: prompt encoder + mask decoder stay out of the state dict
        self.register_buffer("pixel_mean", sam.pixel_mean.clone(), persistent=False)
        self.register_buffer("pixel_std", sam.pixel_std.clone(), persistent=False)
        depth = len(self.image_encoder.blocks)
        if not -depth <= layer < depth:
            raise ValueError(f"SamEncoder(variant='{variant}'): layer={layer} is outside the {depth} encoder blocks.")
        self.layer = layer
        self.image_size = self.image_encoder.img_size
        self.patch_size = self.image_encoder.patch_embed.proj.kernel_size[0]
        self.input_size = (self.image_size, self.image_size)
        self.summary_dim = None
        embed_dim = self.image_encoder.patch_embed.proj.out_channels
        self.dense_dim = self.image_encoder.neck[0].out_channels if layer == -1 else embed_dim

    def sam_model(self) -> Sam:
        """The whole segment_anything Sam this image encoder belongs to (prompt encoder + mask decoder for mask
        probes). Not a submodule: those are outside this encoder's parameters, state dict and `.to()`."""
        return self._sam[0]

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of an image of that size after ResizeLongestSide(img_size)."""
        return ResizeLongestSide.get_preprocess_shape(height, width, self.image_size)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        height, width = self.resized_size(*images.shape[-2:])
        pixels = images * 255.0
        if (height, width) != tuple(images.shape[-2:]):
            pixels = F.interpolate(pixels, (height, width), mode="bilinear", align_corners=False, antialias=True)
        pixels = normalize(pixels, self.pixel_mean.flatten(), self.pixel_std.flatten())
        return F.pad(pixels, (0, self.image_size - width, 0, self.image_size - height))

    def encode(self, pixels: torch.Tensor) -> EncoderOutput:
        """Features of the full padded grid (forward crops them to the image), `chunk_size` images at a time."""
        chunk = self.chunk_size or default_chunk_size(pixels.shape[-2] * pixels.shape[-1] // self.patch_size**2,
                                                      len(pixels), pixels.device.type)
        if len(pixels) <= chunk:
            return self._encode(pixels)
        return EncoderOutput(summary=None, dense=torch.cat([self._encode(part).dense for part in pixels.split(chunk)]))

    def _encode(self, pixels: torch.Tensor) -> EncoderOutput:
        encoder = self.image_encoder
        if self.layer == -1:
            return EncoderOutput(summary=None, dense=encoder(pixels))
        tokens = encoder.patch_embed(pixels)  # [B, h, w, C]
        if encoder.pos_embed is not None:
            tokens = tokens + encoder.pos_embed
        last = self.layer % len(encoder.blocks)
        for block in encoder.blocks[: last + 1]:
            tokens = block(tokens)
        return EncoderOutput(summary=None, dense=tokens.permute(0, 3, 1, 2))

    def forward(self, images: torch.Tensor) -> EncoderOutput:
        output = super().forward(images)
        height, width = self.resized_size(*images.shape[-2:])
        rows, cols = math.ceil(height / self.patch_size), math.ceil(width / self.patch_size)
        return EncoderOutput(summary=None, dense=output.dense[:, :, :rows, :cols])
