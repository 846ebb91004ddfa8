"""Write tiny randomly initialised teacher checkpoints in each library's NATIVE format.

Test fixtures (not part of the package): the encoders load them through the libraries' real loaders.

    write_open_clip_dir(tmp / "clip")             # open_clip local-dir: open_clip_config.json + weights
    name = register_open_clip_config(tmp / "cfg") # registers TINY_CLIP_NAME with open_clip (for `pretrained` files)
    write_open_clip_state_dict(tmp / "clip.pt")   # plain state dict for OpenClipEncoder(name, pretrained=...)
    write_timm_dir(tmp / "dino", reg_tokens=4)    # timm local-dir: config.json + model.safetensors
    write_timm_state_dict(tmp / "vit.pth")        # for TimmEncoder(TINY_VIT_NAME, checkpoint=...)
    write_sam_state_dict(tmp / "sam.pth")         # like the official sam_vit_b_01ec64.pth, variant 'tiny'

Importing this module registers the timm models TINY_VIT_NAME and TINY_VIT_REG_NAME.
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import timm
import torch
from timm.models import generate_default_cfgs, register_model, save_for_hf
from timm.models.vision_transformer import VisionTransformer, _cfg, _create_vision_transformer

from distill.encoders.clip import save_open_clip_dir
from distill.encoders.sam import build_sam
from distill.common.io import atomic_write

TINY_CLIP_NAME = "unitower-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
# Non-default statistics so tests can see they are read from the config, not hard-coded.
TINY_CLIP_PREPROCESS = {"mean": [0.45, 0.46, 0.47], "std": [0.25, 0.26, 0.27], "interpolation": "bicubic", "resize_mode": "shortest"}

TINY_VIT_NAME = "unitower_tiny_vit"
TINY_VIT_REG_NAME = "unitower_tiny_vit_reg4"
_TINY_VIT_ARGS = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2)
# timm's register_model reads this module's `default_cfgs` (preprocessing metadata of the names below).
default_cfgs = generate_default_cfgs({
    TINY_VIT_NAME: _cfg(input_size=(3, 32, 32), num_classes=0, crop_pct=0.9),
    TINY_VIT_REG_NAME: _cfg(input_size=(3, 32, 32), num_classes=0, crop_pct=0.9),
})


@register_model
def unitower_tiny_vit(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Tiny timm ViT (32 px, patch 8, 32 dims, 3 blocks) for tests and the toy world."""
    return _create_vision_transformer(TINY_VIT_NAME, pretrained=pretrained, **dict(_TINY_VIT_ARGS, **kwargs))


@register_model
def unitower_tiny_vit_reg4(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Tiny timm ViT with 4 register tokens (DINOv2-reg layout)."""
    args = dict(_TINY_VIT_ARGS, reg_tokens=4, no_embed_class=True)
    return _create_vision_transformer(TINY_VIT_REG_NAME, pretrained=pretrained, **dict(args, **kwargs))


def tiny_open_clip_model(seed: int = 0) -> torch.nn.Module:
    """A random open_clip CLIP built from TINY_CLIP_CONFIG."""
    torch.manual_seed(seed)
    return open_clip.CLIP(**TINY_CLIP_CONFIG).eval()


def write_open_clip_dir(folder: Path, seed: int = 0) -> Path:
    """open_clip's local-dir format (open_clip_config.json with model_cfg + preprocess_cfg,
    open_clip_model.safetensors); load with OpenClipEncoder('local-dir:' + folder)."""
    return save_open_clip_dir(tiny_open_clip_model(seed), folder, TINY_CLIP_CONFIG, TINY_CLIP_PREPROCESS)


def register_open_clip_config(folder: Path) -> str:
    """Write TINY_CLIP_NAME.json into `folder` and add it to open_clip's model registry; returns the name.
    Built-in open_clip configs carry no preprocess cfg, so this model uses open_clip's defaults."""
    file = atomic_write(Path(folder) / f"{TINY_CLIP_NAME}.json", lambda p: Path(p).write_text(json.dumps(TINY_CLIP_CONFIG)))
    open_clip.add_model_config(file)
    return TINY_CLIP_NAME


def write_open_clip_state_dict(path: Path, seed: int = 0) -> Path:
    """Plain torch.save state dict of the tiny CLIP (what `pretrained=FILE` loads)."""
    state = tiny_open_clip_model(seed).state_dict()
    return atomic_write(Path(path), lambda p: torch.save(state, p))


def tiny_timm_model(reg_tokens: int = 0, seed: int = 0, **pretrained_cfg: object) -> torch.nn.Module:
    """A random tiny timm ViT (TINY_VIT_NAME / TINY_VIT_REG_NAME); `pretrained_cfg` overrides
    preprocessing metadata (mean, std, crop_pct, interpolation) saved with it."""
    torch.manual_seed(seed)
    name = TINY_VIT_REG_NAME if reg_tokens else TINY_VIT_NAME
    return timm.create_model(name, pretrained_cfg_overlay=dict(pretrained_cfg)).eval()


def write_timm_dir(folder: Path, reg_tokens: int = 0, seed: int = 0, **pretrained_cfg: object) -> Path:
    """timm's local-dir format (config.json + model.safetensors, via timm.models.save_for_hf);
    load with TimmEncoder('local-dir:' + folder). The config names the architecture and its args."""
    model = tiny_timm_model(reg_tokens, seed, **pretrained_cfg)
    save_for_hf(model, str(folder), safe_serialization=True)
    return Path(folder)


def write_timm_state_dict(path: Path, reg_tokens: int = 0, seed: int = 0) -> Path:
    """Plain torch.save state dict of the tiny ViT (what pretrained_cfg_overlay=dict(file=...) loads)."""
    state = tiny_timm_model(reg_tokens, seed).state_dict()
    return atomic_write(Path(path), lambda p: torch.save(state, p))


def write_sam_state_dict(path: Path, seed: int = 0) -> Path:
    """Plain torch.save state dict of a random Sam 'tiny' (same format as the official SAM .pth)."""
    torch.manual_seed(seed)
    state = build_sam("tiny").state_dict()
    return atomic_write(Path(path), lambda p: torch.save(state, p))


def tiny_teacher_set(files: dict, names=("clip", "dino", "sam")) -> list:
    """distill Teachers over the tiny checkpoints `files` (the `tiny_teacher_files` fixture), in `names` order."""
    from distill.encoders import OpenClipEncoder, SamEncoder, TimmEncoder
    from distill.teacher import Teacher

    build = {
        "clip": lambda: Teacher("clip", OpenClipEncoder(f"local-dir:{files['clip']}")),
        "dino": lambda: Teacher("dino", TimmEncoder(f"local-dir:{files['dino']}", crop_pct=1.0)),
        "sam": lambda: Teacher("sam", SamEncoder("tiny", str(files["sam"]))),
    }
    return [build[name]() for name in names]
