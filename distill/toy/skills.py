"""Skill report of the toy teachers on held-out images (ToyWorld seed HELDOUT_SEED), trained vs untrained.

- CLIP: zero-shot shape accuracy on single-object images, from text prompts "a {shape}." (the captions name
  shapes only).
- DINO: k-NN (k=10, cosine, CLS features) accuracy of shape and texture on single-object images, with
  a bank of single-object training images.
- SAM: mean IoU over all objects of multi-object images, prompted with one point (the mask pixel
  nearest to the centroid).

Each teacher is loaded from its checkpoint through its library's own loader; the untrained baseline is
the same architecture with random weights. The scores come from distill/encoders/probes.py, which the
in-training benchmarks of the student (distill/benchmarks/) share; `shape_prompts` and `object_labels`
are the toy world's prompts and labels for both.

    python -m distill.toy report [--cache DIR]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import open_clip
import timm
import torch
from segment_anything.modeling import Sam
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from distill.encoders.probes import knn_accuracy, point_miou, zero_shot_accuracy
from distill.encoders.resize import normalize
from distill.encoders.sam import build_sam
from distill.toy.train_clip import build_clip, normalize_clip
from distill.toy.train_dino import build_dino_vit
from distill.toy.train_sam import sam_pixels
from distill.toy.world import HELDOUT_SEED, SHAPES, TEXTURES, TRAIN_SEED, ToySample, sample_pool


def shape_prompts() -> tuple[list[str], dict[str, list[str]]]:
    """The toy zero-shot prompts "a {shape}." (the words the captions use: shapes only, never colour), and
    {attribute: the class each prompt names} for 'shape'."""
    return [f"a {s}." for s in SHAPES], {"shape": list(SHAPES)}


def object_labels(samples: list[ToySample], attribute: str) -> list[str]:
    """The `attribute` (color, shape, texture, size) of each single-object sample's object."""
    return [getattr(s.objects[0], attribute) for s in samples]


@torch.inference_mode()
def clip_zero_shot(model: open_clip.CLIP, tokenizer, num_images: int = 500) -> dict[str, float]:
    """Zero-shot shape accuracy of an open_clip model on held-out single-object images."""
    images, samples = sample_pool(HELDOUT_SEED, num_images, max_objects=1)
    prompts, prompt_classes = shape_prompts()
    text = model.encode_text(tokenizer(prompts))
    image = torch.cat([model.encode_image(normalize_clip(chunk)) for chunk in torch.from_numpy(images).split(256)])
    return {f"{attribute}_acc": zero_shot_accuracy(image, text, prompt_classes[attribute], object_labels(samples, attribute))
            for attribute in prompt_classes}


@torch.inference_mode()
def _cls_features(backbone: torch.nn.Module, images: np.ndarray) -> torch.Tensor:
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    pixels = normalize(pixels, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    return torch.cat([backbone.forward_features(chunk)[:, 0] for chunk in pixels.split(256)])


def dino_knn(backbone: torch.nn.Module, num_bank: int = 1000, num_query: int = 500) -> dict[str, float]:
    """k-NN (k=10, cosine) shape and texture accuracy of a ViT's CLS features on single-object images."""
    bank_images, bank_samples = sample_pool(TRAIN_SEED, num_bank, max_objects=1)
    query_images, query_samples = sample_pool(HELDOUT_SEED, num_query, max_objects=1)
    bank, query = _cls_features(backbone, bank_images), _cls_features(backbone, query_images)
    return {f"{attribute}_acc": knn_accuracy(bank, object_labels(bank_samples, attribute), query,
                                             object_labels(query_samples, attribute), k=10)
            for attribute in ("shape", "texture")}


@torch.inference_mode()
def sam_point_miou(sam: Sam, num_images: int = 200) -> dict[str, float]:
    """Mean IoU of single-mask predictions from one point per object on held-out images."""
    images, samples = sample_pool(HELDOUT_SEED, num_images)
    embeddings = torch.cat([sam.image_encoder(sam_pixels(sam, chunk)) for chunk in torch.from_numpy(images).split(64)])
    return {"point_miou": point_miou(sam, embeddings, [torch.from_numpy(s.masks) for s in samples])}


def skill_report(paths: dict[str, Path], seed: int = 0) -> dict[str, dict[str, dict[str, float]]]:
    """{teacher: {"untrained": {...}, "trained": {...}}} for the teachers in `paths`
    ('clip' folder, 'dino' folder, 'sam' .pth)."""

    torch.manual_seed(seed)
    report: dict[str, dict[str, dict[str, float]]] = {}
    if "clip" in paths:
        tokenizer = open_clip.get_tokenizer(f"local-dir:{paths['clip']}")
        trained = open_clip.create_model(f"local-dir:{paths['clip']}").eval()
        report["clip"] = {"untrained": clip_zero_shot(build_clip().eval(), tokenizer), "trained": clip_zero_shot(trained, tokenizer)}
    if "dino" in paths:
        trained = timm.create_model(f"local-dir:{paths['dino']}", pretrained=True).eval()
        report["dino"] = {"untrained": dino_knn(build_dino_vit().eval()), "trained": dino_knn(trained)}
    if "sam" in paths:
        report["sam"] = {"untrained": sam_point_miou(build_sam("tiny")), "trained": sam_point_miou(build_sam("tiny", str(paths["sam"])))}
    return report


CHANCE = {
    ("clip", "shape_acc"): 1 / len(SHAPES),
    ("dino", "shape_acc"): 1 / len(SHAPES), ("dino", "texture_acc"): 1 / len(TEXTURES),
}


def format_report(report: dict[str, dict[str, dict[str, float]]]) -> str:
    """A plain-text table: teacher, skill, chance, untrained, trained."""
    lines = [f"{'teacher':<8}{'skill':<14}{'chance':>8}{'untrained':>11}{'trained':>9}"]
    for teacher, result in report.items():
        for skill, value in result["trained"].items():
            chance = CHANCE.get((teacher, skill))
            chance_text = f"{chance:.3f}" if chance is not None else "-"
            lines.append(f"{teacher:<8}{skill:<14}{chance_text:>8}{result['untrained'][skill]:>11.3f}{value:>9.3f}")
    return "\n".join(lines)
