"""Frozen-feature probes: plain-torch scores of encoder features (no Lightning, no training).

- `knn_accuracy`: cosine k-NN majority vote of query features against a labelled bank.
- `zero_shot_accuracy`: each image gets the class of its most similar text prompt (CLIP zero-shot).
- `point_miou`: SAM's own prompt encoder + mask decoder fed image embeddings [B, C, h, w] (a SAM teacher's, or a
  student's prediction of them), one point per ground-truth mask, mean IoU over all masks.

The toy teachers' skill report (distill/toy/skills.py) and the in-training benchmarks (distill/benchmarks/) both
score with these functions; they live in the encoders layer so that both may import them (tests/test_import_direction.py).

    knn_accuracy(bank, bank_labels, query, query_labels, k=10)           # features [N, C], any scale
    zero_shot_accuracy(image_features, text_features, prompt_classes, labels)
    point_miou(sam, embeddings, masks)    # masks: one bool [N_i, H, W] tensor per image
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide


def knn_accuracy(
    bank: torch.Tensor, bank_labels: Sequence[Hashable], query: torch.Tensor, query_labels: Sequence[Hashable], k: int = 10
) -> float:
    """Accuracy of a cosine k-NN majority vote: bank [M, C] with M labels, query [N, C] with N labels (features are
    L2-normalized here). Ties go to the class that sorts first; k is capped at M."""
    if len(bank) != len(bank_labels) or len(query) != len(query_labels):
        raise ValueError(f"knn_accuracy: {len(bank)} bank features with {len(bank_labels)} labels, "
                         f"{len(query)} query features with {len(query_labels)} labels; give one label per feature.")
    bank, query = F.normalize(bank.float(), dim=-1), F.normalize(query.float(), dim=-1)
    classes = sorted(set(bank_labels))
    bank_ids = torch.tensor([classes.index(label) for label in bank_labels], device=bank.device)
    top = (query @ bank.T).topk(min(k, len(bank)), dim=1).indices
    votes = F.one_hot(bank_ids[top], len(classes)).sum(dim=1)
    predicted = [classes[i] for i in votes.argmax(dim=1).tolist()]
    return sum(p == t for p, t in zip(predicted, query_labels)) / max(1, len(query_labels))


def zero_shot_accuracy(
    image_features: torch.Tensor, text_features: torch.Tensor, prompt_classes: Sequence[Hashable], labels: Sequence[Hashable]
) -> float:
    """Accuracy when each image [N, D] takes the class of its most cosine-similar prompt (text features [P, D];
    `prompt_classes[p]` is the class prompt p names, so several prompts per class act as a max over them)."""
    if len(text_features) != len(prompt_classes) or len(image_features) != len(labels):
        raise ValueError(f"zero_shot_accuracy: {len(text_features)} text features for {len(prompt_classes)} prompt "
                         f"classes, {len(image_features)} image features for {len(labels)} labels; give one per row.")
    if image_features.shape[-1] != text_features.shape[-1]:
        raise ValueError(f"zero_shot_accuracy: image features have {image_features.shape[-1]} channels, text features "
                         f"{text_features.shape[-1]}: they must come from the same CLIP embedding space.")
    image, text = F.normalize(image_features.float(), dim=-1), F.normalize(text_features.float(), dim=-1)
    best = (image @ text.T).argmax(dim=1).tolist()
    return sum(prompt_classes[b] == label for b, label in zip(best, labels)) / max(1, len(labels))


def point_prompts(masks: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One (x, y) pixel per mask [N,H,W] -> [N,1,2]: random inside the mask, or (generator None) the
    mask pixel nearest to the mask's centroid (a deterministic 'click on the object')."""
    points = []
    for mask in masks:
        ys, xs = torch.nonzero(mask, as_tuple=True)
        if generator is None:
            cy, cx = ys.float().mean(), xs.float().mean()
            pick = ((ys - cy) ** 2 + (xs - cx) ** 2).argmin()
        else:
            pick = torch.randint(len(ys), (1,), generator=generator)[0]
        points.append(torch.stack([xs[pick], ys[pick]]).float())
    return torch.stack(points).unsqueeze(1)


def predict_masks(
    sam: Sam,
    embedding: torch.Tensor,
    points: torch.Tensor | None = None,
    boxes: torch.Tensor | None = None,
    image_hw: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask logits [N,H,W] and predicted IoU [N] for N prompts on ONE image embedding [1,C,h,w] (points [N,1,2] in
    pixels, positive label; or boxes [N,4]) of an image of size `image_hw` (None: SAM's own input size), as
    SamPredictor does: prompts mapped by ResizeLongestSide, masks upsampled back to the image."""
    size = sam.image_encoder.img_size
    height, width = image_hw or (size, size)
    resized = ResizeLongestSide.get_preprocess_shape(height, width, size)
    if (height, width) != (size, size):
        scale = torch.tensor([resized[1] / width, resized[0] / height], device=embedding.device)
        points = None if points is None else points * scale
        boxes = None if boxes is None else boxes * scale.repeat(2)
    point_input = None if points is None else (points, torch.ones(points.shape[:2], dtype=torch.int, device=points.device))
    sparse, dense = sam.prompt_encoder(points=point_input, boxes=boxes, masks=None)
    low_res, iou = sam.mask_decoder(
        image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
    )
    logits = sam.postprocess_masks(low_res, resized, (height, width))
    return logits[:, 0], iou[:, 0]


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU per mask of boolean [N,H,W] tensors -> [N]."""
    inter = (pred & target).flatten(1).sum(1).float()
    union = (pred | target).flatten(1).sum(1).float()
    return inter / union.clamp(min=1)


@torch.inference_mode()
def point_miou(sam: Sam, embeddings: torch.Tensor, masks: Sequence[torch.Tensor]) -> float:
    """Mean IoU over every ground-truth mask of single-mask predictions prompted with one point each (the mask
    pixel nearest its centroid). embeddings [B, C, h, w] on SAM's embedding grid (a teacher's, or a student's
    prediction resized to it); masks[b]: bool [N_b, H, W] at the image size (images square or not)."""
    grid = tuple(sam.prompt_encoder.image_embedding_size)
    if tuple(embeddings.shape[-2:]) != grid or len(embeddings) != len(masks):
        raise ValueError(f"point_miou: embeddings {tuple(embeddings.shape)} for {len(masks)} images; SAM's mask decoder "
                         f"needs one [C, {grid[0]}, {grid[1]}] embedding per image (resize predictions to that grid).")
    ious = []
    for b, image_masks in enumerate(masks):
        if len(image_masks) == 0:
            continue
        image_masks = image_masks.to(embeddings.device)
        logits, _ = predict_masks(sam, embeddings[b : b + 1], points=point_prompts(image_masks, None),
                                  image_hw=tuple(image_masks.shape[-2:]))
        ious.append(mask_iou(logits > sam.mask_threshold, image_masks))
    if not ious:
        raise ValueError("point_miou: no ground-truth masks in any image; nothing to score.")
    return float(torch.cat(ious).mean())
