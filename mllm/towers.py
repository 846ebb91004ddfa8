"""Vision towers: images [B, 3, H, W] in [0, 1] -> visual tokens [B, N, C], with attributes `dim` (C) and
`num_tokens` (N).

    SingleEncoderTower(encoder)                  one distill encoder (CLIP, DINOv2, SAM, any timm/open_clip)
    EnsembleTower([clip, dino, sam])             several encoders fused on a common token grid
    StudentTower("runs/export")                  the distilled student from `python -m distill export`

Every tower takes `grid` (resample to grid x grid tokens, so all variants can get the same visual-token
budget) and `trainable` (False: frozen, eval mode, run under inference mode).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from distill.encoders.base import Encoder
from distill.exported import StudentEncoder


def resample_grid(dense: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resample a [B, C, h, w] map to `size`: adaptive average pooling when shrinking, bilinear otherwise."""
    if tuple(dense.shape[-2:]) == tuple(size):
        return dense
    if size[0] <= dense.shape[-2] and size[1] <= dense.shape[-1]:
        return F.adaptive_avg_pool2d(dense, size)
    return F.interpolate(dense, size=size, mode="bilinear", align_corners=False)


class VisionTower(nn.Module):
    """Base class: subclasses set `dim`, `input_size` and implement `tokens(images) -> [B, N, C]`."""

    dim: int
    input_size: tuple[int, int]

    def __init__(self, trainable: bool) -> None:
        super().__init__()
        self.trainable = trainable
        self._num_tokens: int | None = None

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.trainable:
            return self.tokens(images)
        with torch.inference_mode():
            tokens = self.tokens(images)
        return tokens.clone()  # a normal tensor: inference tensors cannot be saved for the projector's backward

    @property
    def num_tokens(self) -> int:
        """Tokens per image (measured once with a forward at the tower's input size)."""
        if self._num_tokens is None:
            parameter = next(self.parameters(), None)
            probe = torch.zeros(1, 3, *self.input_size, device=parameter.device if parameter is not None else "cpu")
            with torch.inference_mode():
                self._num_tokens = int(self.tokens(probe).shape[1])
        return self._num_tokens

    def _set_trainable(self, encoders: list[Encoder]) -> None:
        for encoder in encoders:
            if self.trainable:
                encoder.unfreeze()
            else:
                encoder.freeze()


def _grid_size(grid: int | None, dense: torch.Tensor) -> tuple[int, int]:
    return tuple(dense.shape[-2:]) if grid is None else (grid, grid)


class SingleEncoderTower(VisionTower):
    """One encoder's dense features as tokens (row-major), optionally preceded by its CLS/summary token.

    Args:
        encoder: any distill Encoder (its `layer` picks the feature layer; LLaVA-1.5 uses -2).
        keep_cls: prepend the encoder's summary token (needs summary_dim == dense_dim, e.g. a ViT CLS).
        grid: resample the dense map to grid x grid tokens; None keeps the encoder's own grid.
        trainable: train the encoder too; False freezes it (eval mode, inference mode).
    """

    def __init__(self, encoder: Encoder, keep_cls: bool = False, grid: int | None = None, trainable: bool = False) -> None:
        super().__init__(trainable)
        if keep_cls and encoder.summary_dim != encoder.dense_dim:
            raise ValueError(
                f"keep_cls=True needs a summary token as wide as the dense tokens, but {type(encoder).__name__} has "
                f"summary_dim={encoder.summary_dim} and dense_dim={encoder.dense_dim}; use keep_cls: false or a layer "
                "whose summary is the CLS token (e.g. layer: -2)."
            )
        self.encoder = encoder
        self.keep_cls = keep_cls
        self.grid = grid
        self.dim = encoder.dense_dim
        self.input_size = tuple(encoder.input_size)
        self._set_trainable([encoder])

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        out = self.encoder(images)
        dense = resample_grid(out.dense, _grid_size(self.grid, out.dense))
        tokens = dense.flatten(2).transpose(1, 2)
        if self.keep_cls:
            if out.summary is None:
                raise ValueError(f"keep_cls=True but {type(self.encoder).__name__} returned no summary token.")
            tokens = torch.cat([out.summary[:, None], tokens], dim=1)
        return tokens


class EnsembleTower(VisionTower):
    """Several encoders fused into one token sequence.

    fusion="channel" (default, as EAGLE / Prismatic): each dense map is resampled to a common grid and the
    maps are concatenated along channels -> [B, g*g, sum(C_i)]. fusion="sequence": each encoder's tokens
    follow one another -> [B, sum(N_i), sum(C_i)], every encoder in its own channel block (zeros elsewhere),
    so the projector's first linear layer acts as a separate projection per encoder.

    Args:
        encoders: the distill Encoders (e.g. CLIP, DINOv2, SAM), in token/channel order.
        fusion: "channel" or "sequence".
        grid: common grid side; None = the smallest grid among the encoders (channel) or each own grid (sequence).
        trainable: train the encoders too; False freezes them.
    """

    def __init__(
        self,
        encoders: list[Encoder],
        fusion: Literal["channel", "sequence"] = "channel",
        grid: int | None = None,
        trainable: bool = False,
    ) -> None:
        super().__init__(trainable)
        if not encoders:
            raise ValueError("EnsembleTower needs at least one encoder in `encoders`.")
        if fusion not in ("channel", "sequence"):
            raise ValueError(f"EnsembleTower fusion='{fusion}' is unknown; use 'channel' or 'sequence'.")
        self.encoders = nn.ModuleList(encoders)
        self.fusion = fusion
        self.grid = grid
        self.dims = [encoder.dense_dim for encoder in encoders]
        self.dim = sum(self.dims)
        self.input_size = tuple(encoders[0].input_size)
        self._set_trainable(list(encoders))

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        dense_maps = [encoder(images).dense for encoder in self.encoders]
        if self.fusion == "channel":
            size = (self.grid, self.grid) if self.grid else (
                min(d.shape[-2] for d in dense_maps), min(d.shape[-1] for d in dense_maps))
            fused = torch.cat([resample_grid(d, size) for d in dense_maps], dim=1)
            return fused.flatten(2).transpose(1, 2)
        blocks = []
        offset = 0
        for dense in dense_maps:
            tokens = resample_grid(dense, _grid_size(self.grid, dense)).flatten(2).transpose(1, 2)
            blocks.append(F.pad(tokens, (offset, self.dim - offset - tokens.shape[-1])))
            offset += tokens.shape[-1]
        return torch.cat(blocks, dim=1)


class StudentTower(SingleEncoderTower):
    """The distilled student (a `python -m distill export` folder, loaded as distill.model.StudentModel by
    distill.exported.StudentEncoder) as a single-encoder tower.

    Args:
        path: the export folder.
        layer: backbone block whose patch tokens are used (-1 last, -2 penultimate).
        adaptors: teacher names whose adaptor dense outputs are concatenated instead of backbone features.
        keep_cls: prepend the student's summary token (needs matching width).
        grid: resample to grid x grid tokens; None keeps the student's grid.
        trainable: train the student too; False freezes it.
        image_size: resolution the student runs at; None = the export's own.
    """

    def __init__(
        self,
        path: str,
        layer: int = -1,
        adaptors: list[str] | None = None,
        keep_cls: bool = False,
        grid: int | None = None,
        trainable: bool = False,
        image_size: int | None = None,
    ) -> None:
        super().__init__(StudentEncoder(path, layer=layer, adaptors=adaptors, image_size=image_size), keep_cls, grid, trainable)
