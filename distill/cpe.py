"""Cropped position embedding (CPE, AM-RADIO) for a timm VisionTransformer, without changing timm's source.

The ViT's `pos_embed` is stored for a larger `max_grid` x `max_grid` patch grid. For an image of h x w
patches:
- training: every sample adds a random h x w window of the grid (integer offset per sample, drawn from
  torch's global CPU generator, so a checkpoint's saved generator state makes resume exact);
- eval: the centre h x w window (when h, w <= max_grid); larger grids resample the whole grid with timm's
  `resample_abs_pos_embed` (bicubic, antialiased), which training also uses for them.
Prefix tokens (class, registers) keep their own position entries when the model has them.

RADIO itself trains on random windows of random scale (0.32-1 of the grid) and aspect, resampled to the
token grid with `grid_sample`, and evaluates by resampling the whole grid; here windows are cut at the
grid's native density (one grid cell per token), so evaluation takes a window at the same density (the
centre-crop rule in RADIO's commented-out eval branch) rather than a resampled one the model never saw.

    enable_cpe(vit, max_grid=16, fresh=True)   # vit: timm VisionTransformer built with dynamic_img_size=True
    pos = window_pos_embed(vit, 8, 8)          # [1, prefix + 64, C]: the eval position embedding at 8 x 8
"""

from __future__ import annotations

import types

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn


def num_pos_prefix(vit: nn.Module) -> int:
    """Position entries for prefix tokens at the start of `vit.pos_embed` (0 with timm's no_embed_class)."""
    return 0 if vit.no_embed_class else vit.num_prefix_tokens


def grid_of(vit: nn.Module) -> torch.Tensor:
    """The patch part of `vit.pos_embed` as [G, G, C] (G = vit.cpe_max_grid)."""
    size = vit.cpe_max_grid
    return vit.pos_embed[0, num_pos_prefix(vit):].reshape(size, size, -1)


def crop_windows(grid: torch.Tensor, h: int, w: int, offsets: torch.Tensor) -> torch.Tensor:
    """Windows grid[y:y+h, x:x+w] for each (y, x) row of `offsets` [B, 2] from a [G, G, C] grid -> [B, h*w, C]."""
    size = grid.shape[1]
    rows = offsets[:, :1, None] + torch.arange(h, device=grid.device)[None, :, None]  # [B, h, 1]
    cols = offsets[:, 1:, None] + torch.arange(w, device=grid.device)[None, None, :]  # [B, 1, w]
    index = (rows * size + cols).reshape(len(offsets), h * w)
    return grid.reshape(size * size, -1)[index]


def patch_pos_embed(vit: nn.Module, h: int, w: int, batch: int, training: bool) -> torch.Tensor:
    """Position embedding of an h x w patch grid: [batch, h*w, C] random windows in training, [1, h*w, C]
    (centre window, or the resampled grid beyond max_grid) in eval."""
    size = vit.cpe_max_grid
    grid = grid_of(vit)
    if h > size or w > size:
        whole = grid.reshape(1, size * size, -1)
        return resample_abs_pos_embed(whole, new_size=[h, w], old_size=[size, size], num_prefix_tokens=0)
    if training:
        offsets = torch.stack([torch.randint(0, size - h + 1, (batch,)), torch.randint(0, size - w + 1, (batch,))], 1)
    else:
        offsets = torch.tensor([[(size - h) // 2, (size - w) // 2]])
    return crop_windows(grid, h, w, offsets.to(grid.device))


def window_pos_embed(vit: nn.Module, h: int, w: int) -> torch.Tensor:
    """The eval-mode position embedding at an h x w grid in timm's layout [1, prefix entries + h*w, C]: what
    a plain timm model built for that grid needs as `pos_embed` to compute the same features."""
    patches = patch_pos_embed(vit, h, w, 1, training=False)
    return torch.cat([vit.pos_embed[:, : num_pos_prefix(vit)], patches], dim=1)


def _cpe_pos_embed(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm VisionTransformer._pos_embed with CPE: x [B, H, W, C] patch tokens -> [B, prefix + H*W, C]."""
    batch, h, w, dim = x.shape
    x = x.reshape(batch, h * w, dim)
    prefix = []
    if self.cls_token is not None:
        prefix.append(self.cls_token.expand(batch, -1, -1))
    if self.reg_token is not None:
        prefix.append(self.reg_token.expand(batch, -1, -1))
    patches = patch_pos_embed(self, h, w, batch, self.training)
    if self.no_embed_class:
        x = torch.cat(prefix + [x + patches], dim=1)
    else:  # timm's original layout: prefix tokens have position entries too, added after the concat
        x = torch.cat(prefix + [x], dim=1)
        prefix_pos = self.pos_embed[:, : num_pos_prefix(self)].expand(patches.shape[0], -1, -1)
        x = x + torch.cat([prefix_pos, patches], dim=1)
    return self.pos_drop(x)


def enable_cpe(vit: nn.Module, max_grid: int, fresh: bool) -> None:
    """Give timm ViT `vit` (built with dynamic_img_size=True) a `max_grid` x `max_grid` position grid and the
    CPE `_pos_embed` (an instance attribute over the class method; timm's code is unchanged).

    fresh: initialise the grid like timm (truncated normal, std 0.02) instead of resampling the current one
    (resample for pretrained weights, as RADIO does when it loads a smaller pretrained grid)."""
    if not getattr(vit, "dynamic_img_size", False) or not isinstance(getattr(vit, "pos_embed", None), nn.Parameter):
        raise ValueError(f"cpe_max_grid needs a timm ViT with a learned pos_embed and dynamic_img_size; got {type(vit).__name__}.")
    prefix = num_pos_prefix(vit)
    old = vit.pos_embed.data
    old_grid = list(vit.patch_embed.grid_size)
    if fresh:
        grid = torch.empty(1, max_grid * max_grid, old.shape[-1], dtype=old.dtype, device=old.device)
        nn.init.trunc_normal_(grid, std=0.02)
        new = torch.cat([old[:, :prefix], grid], dim=1)
    else:
        new = resample_abs_pos_embed(old, new_size=[max_grid, max_grid], old_size=old_grid, num_prefix_tokens=prefix)
    vit.pos_embed = nn.Parameter(new.contiguous())
    vit.cpe_max_grid = max_grid
    vit._pos_embed = types.MethodType(_cpe_pos_embed, vit)
