"""C-RADIOv4's two loss options as pure functions (Ranzinger, Heinrich et al., "C-RADIOv4 (Tech Report)",
arXiv 2601.17237): a shift-equivariant dense loss (Sec. 2.3, "Shift Equivariance") and an angle-balanced
summary loss (the report's balanced summary loss).

    view = translate(images, dy_px, dx_px)                     # the crop moved by whole pixels, zeros outside
    p, t = aligned_overlap(pred, target, (1, 0), (0, 0))       # the cells both views saw, aligned
    loss = summary_angle_balanced(pred_summary, target_summary)  # angle^2 / the teacher's angular spread^2

What the report's text available here says, and what is implemented (the full equations of Sec. 2.3 and of the
balanced summary loss could not be read from this machine; only the abstract, the introduction, summaries of the
report and the authors' answer in NVlabs/RADIO issue 181 could):
- Shift equivariance: teachers have fixed-pattern noise (artifacts tied to token positions, not to the image).
  The student and each teacher see the image shifted independently, in increments of the patch size, and the
  dense loss is computed only where both views saw the same image content, aligned; a pattern tied to the
  teacher's token positions then lands on a different student position every step and cannot be learned.
  Shifts: ``patch * round(N(0, 0.5))`` per axis (issue 181: "a quantized normal distribution, with std=0.5,
  and then multiply by the patch size"). Here a view is the crop translated with zero fill (`translate`), so
  the sizes stay those of the crop; the overlap excludes the filled border of both views.
- Angle balance: a teacher whose summaries fill a narrow cone (small angles between any two images) gives small
  cosine losses and would be under-weighted next to a teacher with widely spread summaries. The angle between
  student and teacher summary is divided by the teacher's angular dispersion (mean angle of its summaries to
  their mean direction, measured on the batch, detached), so every teacher's loss is in units of its own
  spread. The squared ratio is used because d/dx arccos(x) is unbounded at x -> 1 while d(arccos^2)/dx is not
  (angle^2 ~ 2 (1 - cos) near a match: this is cosine loss rescaled per teacher).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def translate(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """[B, C, H, W] -> the view whose pixel (y, x) is images[..., y + dy, x + dx] (zero outside the image)."""
    out = torch.zeros_like(images)
    H, W = images.shape[-2:]
    if abs(dy) >= H or abs(dx) >= W:
        return out
    src_y, dst_y = slice(max(dy, 0), H + min(dy, 0)), slice(max(-dy, 0), H + min(-dy, 0))
    src_x, dst_x = slice(max(dx, 0), W + min(dx, 0)), slice(max(-dx, 0), W + min(-dx, 0))
    out[..., dst_y, dst_x] = images[..., src_y, src_x]
    return out


def aligned_overlap(
    pred: torch.Tensor, target: torch.Tensor, pred_shift: tuple[int, int], target_shift: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cells of two [B, C, h, w] maps on one grid that saw the same image cell, aligned.

    Map cell i of a view shifted by s cells (`translate` by s * stride pixels) saw image cell i + s; the image
    cells seen by both views (and inside the image) are [max(0, s, u), min(h, h + s, h + u)) per axis, read
    from `pred` at g - s and from `target` at g - u."""
    if pred.shape != target.shape:
        raise ValueError(f"shift-equivariant loss: prediction {tuple(pred.shape)} and target {tuple(target.shape)} "
                         "must be on the same grid (resize the prediction to the teacher's grid first).")
    spans = []
    for axis, size in ((0, pred.shape[-2]), (1, pred.shape[-1])):
        s, u = pred_shift[axis], target_shift[axis]
        lo, hi = max(0, s, u), min(size, size + s, size + u)
        if hi <= lo:
            raise ValueError(f"shift-equivariant loss: shifts {pred_shift} and {target_shift} (cells) leave no "
                             f"overlap on a {tuple(pred.shape[-2:])} grid; lower shift_std.")
        spans.append((lo, hi, s, u))
    (y0, y1, sy, uy), (x0, x1, sx, ux) = spans
    return pred[..., y0 - sy:y1 - sy, x0 - sx:x1 - sx], target[..., y0 - uy:y1 - uy, x0 - ux:x1 - ux]


def draw_shift(generator: torch.Generator, std: float) -> tuple[int, int]:
    """(dy, dx) in cells: round(N(0, std)) per axis from `generator` (C-RADIOv4 uses std 0.5 patches)."""
    return tuple(int(v) for v in torch.round(torch.randn(2, generator=generator) * std).tolist())


def angle(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Angle in radians between the rows of [B, C] `pred` and `target` (float32)."""
    cos = F.cosine_similarity(pred.float(), target.float(), dim=-1, eps=1e-6)
    return torch.arccos(cos.clamp(-1.0 + 1e-7, 1.0 - 1e-7))


def angular_dispersion(summaries: torch.Tensor) -> torch.Tensor:
    """Mean angle (radians) of the rows of [B, C] `summaries` to their mean direction (detached, >= 1e-3)."""
    unit = F.normalize(summaries.detach().float(), dim=-1)
    centre = F.normalize(unit.mean(0, keepdim=True), dim=-1).expand_as(unit)
    return angle(unit, centre).mean().clamp_min(1e-3)


def summary_angle_balanced(pred: torch.Tensor, target: torch.Tensor, dispersion: torch.Tensor | None = None) -> torch.Tensor:
    """mean over the batch of (angle(pred, target) / dispersion)^2, dispersion = the teacher's angular spread
    (`angular_dispersion(target)` when not given)."""
    if pred.shape != target.shape:
        raise ValueError(f"summary prediction shape {tuple(pred.shape)} != teacher target shape {tuple(target.shape)}")
    dispersion = angular_dispersion(target) if dispersion is None else dispersion
    return ((angle(pred, target) / dispersion) ** 2).mean()
