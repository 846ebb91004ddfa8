"""Train the toy SAM teacher: segment_anything's Sam (variant 'tiny') on point and box prompts.

Each step encodes a batch of toy images, prompts every object of every image with either one
random point inside it or its (jittered) box, and trains image encoder, prompt encoder and mask
decoder with BCE + dice against the instance mask, plus the IoU head against the true IoU (as SAM
does, single-mask output). Saved as a plain state-dict .pth (the official SAM checkpoint format) that
`distill.encoders.sam.build_sam('tiny', path)` loads.

    train_sam(OUT_FILE.pth, steps=STEPS)   # normally run by `unitower toy build`
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from tqdm import tqdm

from distill.encoders.probes import mask_iou, point_prompts, predict_masks  # noqa: F401 (re-exported)
from distill.encoders.sam import build_sam
from distill.common.io import atomic_write
from distill.toy.training import optimizer_step, toy_schedule
from distill.toy.world import TRAIN_SEED, ToySample, sample_pool


def sam_pixels(sam: Sam, images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [B,H,W,3] at the model's img_size -> SAM's own normalized, padded input (Sam.preprocess)."""
    return sam.preprocess(images_uint8.permute(0, 3, 1, 2).float())


def box_prompts(masks: torch.Tensor, generator: torch.Generator, jitter: float = 2.0) -> torch.Tensor:
    """Boxes (x0, y0, x1, y1) of masks [N,H,W] -> [N,4], each side moved by up to `jitter` pixels."""
    boxes = []
    for mask in masks:
        ys, xs = torch.nonzero(mask, as_tuple=True)
        boxes.append(torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float())
    boxes = torch.stack(boxes)
    return boxes + (torch.rand(boxes.shape, generator=generator) * 2 - 1) * jitter


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, iou_pred: torch.Tensor) -> torch.Tensor:
    """BCE + dice on mask logits [N,H,W] vs boolean target, + MSE of the IoU head vs the true IoU."""
    target_f = target.float()
    bce = F.binary_cross_entropy_with_logits(logits, target_f)
    prob = logits.sigmoid().flatten(1)
    dice = 1 - (2 * (prob * target_f.flatten(1)).sum(1) + 1) / (prob.sum(1) + target_f.flatten(1).sum(1) + 1)
    true_iou = mask_iou(logits > 0, target).detach()
    return bce + dice.mean() + F.mse_loss(iou_pred, true_iou)


def decode_batched(
    sam: Sam, embeddings: torch.Tensor, image_ids: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-mask logits [N,H,W] and IoU [N] for N prompts spread over a batch of image embeddings
    [B,C,h,w] (`image_ids` [N] says which image each prompt belongs to).

    Same computation as MaskDecoder.predict_masks (which takes ONE image per call), with the image
    embedding gathered per prompt instead of repeated, so a training batch needs one decoder call.
    """
    decoder = sam.mask_decoder
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1), sparse), dim=1)
    src = embeddings[image_ids] + dense
    pos_src = sam.prompt_encoder.get_dense_pe().expand(src.shape[0], -1, -1, -1)
    b, c, h, w = src.shape
    hs, src = decoder.transformer(src, pos_src, tokens)
    upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
    hyper = decoder.output_hypernetworks_mlps[0](hs[:, 1, :])  # mask token 0 = the single-mask output
    low_res = (hyper.unsqueeze(1) @ upscaled.flatten(2)).view(b, 1, *upscaled.shape[-2:])
    iou = decoder.iou_prediction_head(hs[:, 0, :])[:, 0]
    size = sam.image_encoder.img_size
    return sam.postprocess_masks(low_res, (size, size), (size, size))[:, 0], iou


def sam_batch_loss(
    sam: Sam, images_uint8: torch.Tensor, samples: list[ToySample], generator: torch.Generator
) -> torch.Tensor:
    """Loss of one batch: every object prompted by a random point or its jittered box (coin flip per image)."""
    embeddings = sam.image_encoder(sam_pixels(sam, images_uint8))
    sparse, dense, image_ids, targets = [], [], [], []
    for use_points in (True, False):
        chosen = [b for b in range(len(samples)) if (torch.rand(1, generator=generator).item() < 0.5) == use_points]
        if not chosen:
            continue
        masks = torch.cat([torch.from_numpy(samples[b].masks) for b in chosen])
        if use_points:
            points = point_prompts(masks, generator)
            prompt = sam.prompt_encoder(points=(points, torch.ones(points.shape[:2], dtype=torch.int)), boxes=None, masks=None)
        else:
            prompt = sam.prompt_encoder(points=None, boxes=box_prompts(masks, generator), masks=None)
        sparse.append(prompt[0])
        dense.append(prompt[1])
        image_ids += [b for b in chosen for _ in range(len(samples[b].objects))]
        targets.append(masks)
    logits, iou = decode_batched(sam, embeddings, torch.tensor(image_ids), torch.cat(sparse), torch.cat(dense))
    return segmentation_loss(logits, torch.cat(targets), iou)


def save_sam(sam: Sam, out_file: str | Path) -> Path:
    """Write the full Sam state dict as a .pth (official format), via a temp file and rename."""
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in sam.state_dict().items()}
    atomic_write(out, lambda tmp: torch.save(state, tmp))
    return out


def train_sam(
    out_file: str | Path,
    steps: int = 400,
    batch_size: int = 16,
    num_samples: int = 4000,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Train a tiny SAM on training-world images and instance masks; save its state dict to `out_file`.

    Args:
        out_file: .pth file to write.
        steps: optimizer steps.
        batch_size: images per step (all their objects are prompted).
        num_samples: size of the training pool drawn from ToyWorld(seed=TRAIN_SEED).
        lr: peak AdamW learning rate (warmup, cosine decay).
        seed: torch seed for initialisation, prompts and batch order.
        progress: show a tqdm bar.
    """
    torch.manual_seed(seed)
    images, samples = sample_pool(TRAIN_SEED, num_samples)
    pixels_all = torch.from_numpy(images)
    sam = build_sam("tiny").train()
    optimizer = torch.optim.AdamW(sam.parameters(), lr=lr, weight_decay=0.01)
    schedule = toy_schedule(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="toy sam", disable=not progress)
    for _ in bar:
        batch = torch.randint(len(samples), (batch_size,), generator=generator)
        loss = optimizer_step(sam_batch_loss(sam, pixels_all[batch], [samples[i] for i in batch.tolist()], generator),
                              optimizer, schedule, max_norm=1.0)
        bar.set_postfix(loss=f"{loss:.3f}")
    return save_sam(sam.eval(), out_file)
