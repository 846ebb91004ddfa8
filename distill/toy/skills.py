"""Skill report of the toy teachers on held-out images (ToyWorld seed HELDOUT_SEED), trained vs untrained.

- CLIP: zero-shot color and shape accuracy on single-object images, from text prompts "a {color} {shape}."
  (the arg-max over all color x shape prompts gives both answers).
- DINO: k-NN (k=10, cosine, CLS features) accuracy of shape and texture on single-object images, with
  a bank of single-object training images.
- SAM: mean IoU over all objects of multi-object images, prompted with one point (the mask pixel
  nearest to the centroid).

Each teacher is loaded from its checkpoint through its library's own loader; the untrained baseline is
the same architecture with random weights.

    python -m distill.toy report [--cache DIR]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import open_clip
import timm
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from distill.encoders.resize import normalize
from distill.encoders.sam import build_sam
from distill.toy.train_clip import build_clip, normalize_clip
from distill.toy.train_dino import build_dino_vit
from distill.toy.train_sam import mask_iou, point_prompts, predict_masks, sam_pixels
from distill.toy.world import COLORS, HELDOUT_SEED, SHAPES, TEXTURES, TRAIN_SEED, sample_pool


@torch.inference_mode()
def clip_zero_shot(model: open_clip.CLIP, tokenizer, num_images: int = 500) -> dict[str, float]:
    """Zero-shot color and shape accuracy of an open_clip model on held-out single-object images."""
    images, samples = sample_pool(HELDOUT_SEED, num_images, max_objects=1)
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    text = model.encode_text(tokenizer([f"a {c} {s}." for c, s in pairs]), normalize=True)
    image = torch.cat([model.encode_image(normalize_clip(chunk), normalize=True) for chunk in torch.from_numpy(images).split(256)])
    best = (image @ text.T).argmax(dim=1).tolist()
    color = np.mean([pairs[b][0] == s.objects[0].color for b, s in zip(best, samples)])
    shape = np.mean([pairs[b][1] == s.objects[0].shape for b, s in zip(best, samples)])
    return {"color_acc": float(color), "shape_acc": float(shape)}


@torch.inference_mode()
def _cls_features(backbone: torch.nn.Module, images: np.ndarray) -> torch.Tensor:
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    pixels = normalize(pixels, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    feats = torch.cat([backbone.forward_features(chunk)[:, 0] for chunk in pixels.split(256)])
    return F.normalize(feats, dim=-1)


def knn_accuracy(bank: torch.Tensor, bank_labels: list[str], query: torch.Tensor, query_labels: list[str], k: int = 10) -> float:
    """Accuracy of a cosine k-NN majority vote (features already L2-normalized)."""
    classes = sorted(set(bank_labels))
    bank_ids = torch.tensor([classes.index(label) for label in bank_labels])
    top = (query @ bank.T).topk(k, dim=1).indices
    votes = F.one_hot(bank_ids[top], len(classes)).sum(dim=1)
    predicted = [classes[i] for i in votes.argmax(dim=1).tolist()]
    return float(np.mean([p == t for p, t in zip(predicted, query_labels)]))


def dino_knn(backbone: torch.nn.Module, num_bank: int = 1000, num_query: int = 500) -> dict[str, float]:
    """k-NN shape and texture accuracy of a ViT's CLS features on single-object images."""
    bank_images, bank_samples = sample_pool(TRAIN_SEED, num_bank, max_objects=1)
    query_images, query_samples = sample_pool(HELDOUT_SEED, num_query, max_objects=1)
    bank, query = _cls_features(backbone, bank_images), _cls_features(backbone, query_images)
    result = {}
    for attribute in ("shape", "texture"):
        result[f"{attribute}_acc"] = knn_accuracy(
            bank, [getattr(s.objects[0], attribute) for s in bank_samples],
            query, [getattr(s.objects[0], attribute) for s in query_samples],
        )
    return result


@torch.inference_mode()
def sam_point_miou(sam: Sam, num_images: int = 200) -> dict[str, float]:
    """Mean IoU of single-mask predictions from one point per object on held-out images."""
    images, samples = sample_pool(HELDOUT_SEED, num_images)
    embeddings = torch.cat([sam.image_encoder(sam_pixels(sam, chunk)) for chunk in torch.from_numpy(images).split(64)])
    ious = []
    for b, sample in enumerate(samples):
        masks = torch.from_numpy(sample.masks)
        logits, _ = predict_masks(sam, embeddings[b : b + 1], points=point_prompts(masks, None))
        ious.append(mask_iou(logits > sam.mask_threshold, masks))
    return {"point_miou": float(torch.cat(ious).mean())}


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
    ("clip", "color_acc"): 1 / len(COLORS), ("clip", "shape_acc"): 1 / len(SHAPES),
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
