"""Train the toy CLIP teacher: a tiny open_clip CLIP trained with open_clip.ClipLoss on toy captions.

The model is built from a custom model config (data, like open_clip's model_configs/*.json) and saved
as a folder that open_clip loads with `create_model('local-dir:' + folder)`:
open_clip_config.json ({"model_cfg", "preprocess_cfg"}) + open_clip_model.safetensors.
The tokenizer is open_clip's default SimpleTokenizer (its BPE vocab ships inside the package).

    train_clip(OUT_DIR, steps=STEPS)    # normally run by `unitower toy build`
"""

from __future__ import annotations

import math
from pathlib import Path

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from tqdm import tqdm

from distill.encoders.clip import save_open_clip_dir
from distill.encoders.resize import normalize
from distill.toy.training import optimizer_step, toy_schedule
from distill.toy.world import TRAIN_SEED, sample_pool

CONTEXT_LENGTH = 32
CLIP_MODEL_CFG = {
    "embed_dim": 64,
    # pool_type avg: the image embedding is the mean of the patch tokens, so the contrastive loss trains the patch
    # tokens a LLaVA tower reads (with the CLS pool the toy CLIP's patch tokens knew shape no better than untrained)
    "vision_cfg": {"image_size": 64, "layers": 3, "width": 64, "head_width": 32, "patch_size": 8, "pool_type": "avg"},
    "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
# Training images hold 1-2 objects: captions then name few shapes, and each must be told apart to match them.
TRAIN_MAX_OBJECTS = 2
CLIP_PREPROCESS_CFG = {
    "size": 64,
    "mode": "RGB",
    "mean": list(OPENAI_DATASET_MEAN),
    "std": list(OPENAI_DATASET_STD),
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}


def build_clip(model_cfg: dict | None = None) -> open_clip.CLIP:
    """A randomly initialised open_clip CLIP from `model_cfg` (default CLIP_MODEL_CFG)."""
    cfg = model_cfg or CLIP_MODEL_CFG
    return open_clip.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"])


def normalize_clip(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> normalized float [B, 3, H, W] as open_clip's preprocess produces at 64 px."""
    pixels = images_uint8.permute(0, 3, 1, 2).float() / 255.0
    return normalize(pixels, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)


def tokenize(texts: list[str], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """Token ids [N, context_length] from open_clip's default BPE tokenizer."""
    return open_clip.tokenizer.SimpleTokenizer(context_length=context_length)(texts)


def clip_loss(model: open_clip.CLIP, pixels: torch.Tensor, tokens: torch.Tensor, loss_fn: open_clip.ClipLoss) -> torch.Tensor:
    """Symmetric contrastive loss of one batch of (image, caption) pairs."""
    image_features = model.encode_image(pixels, normalize=True)
    text_features = model.encode_text(tokens, normalize=True)
    return loss_fn(image_features, text_features, model.logit_scale.exp())


def save_clip(model: open_clip.CLIP, out_dir: str | Path, model_cfg: dict | None = None) -> Path:
    """Write `model` as an open_clip local-dir folder (config JSON + safetensors) and return the folder."""
    return save_open_clip_dir(model, out_dir, model_cfg or CLIP_MODEL_CFG, CLIP_PREPROCESS_CFG)


def train_clip(
    out_dir: str | Path,
    steps: int = 700,
    batch_size: int = 128,
    num_samples: int = 6000,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Train a toy CLIP on the first `num_samples` training-world images and save it to `out_dir`.

    Args:
        out_dir: folder to write (open_clip local-dir format).
        steps: optimizer steps.
        batch_size: image-caption pairs per step (contrastive negatives come from the same batch).
        num_samples: size of the training pool drawn from ToyWorld(seed=TRAIN_SEED, max_objects=TRAIN_MAX_OBJECTS).
        lr: peak AdamW learning rate (linear warmup, cosine decay).
        seed: torch seed for initialisation and batch order.
        progress: show a tqdm bar.
    """
    torch.manual_seed(seed)
    images, samples = sample_pool(TRAIN_SEED, num_samples, max_objects=TRAIN_MAX_OBJECTS)
    pixels_all = torch.from_numpy(images)
    tokens_all = tokenize([s.caption for s in samples])
    model = build_clip().train()
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = toy_schedule(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="toy clip", disable=not progress)
    for _ in bar:
        batch = torch.randint(len(samples), (batch_size,), generator=generator)
        loss = optimizer_step(clip_loss(model, normalize_clip(pixels_all[batch]), tokens_all[batch], loss_fn),
                              optimizer, schedule)
        with torch.no_grad():  # CLIP clamps the temperature to at most 100
            model.logit_scale.clamp_(0, math.log(100))
        bar.set_postfix(loss=f"{loss:.3f}")
    return save_clip(model.eval(), out_dir)
