"""Vision towers: images [B, 3, H, W] in [0, 1] -> visual tokens [B, N, C], with attributes `dim` (C) and
`num_tokens` (N).

    SingleEncoderTower(encoder)                  one distill encoder (CLIP, DINOv2, SAM, any timm/open_clip)
    EnsembleTower([clip, dino, sam])             several encoders joined by a fusion module (mllm/fusion.py)
    StudentTower("runs/export")                  the distilled student from `python -m distill export`

A tower is two parts: `features(images)` (the encoders: frozen unless `trainable`, then run under inference
mode) gives one raw tensor [B, L_i, N_i, C_i] per encoder, and `fuse(features)` normalises each one by the
tower's `norm` rule and joins them with its fusion module (trainable in both LLaVA stages, if it has
parameters). The cached-feature path (mllm/features.py CachedTower) stores `features` and applies the same
`fuse`, so both paths hand the projector the same tokens.

Every tower takes `grid` (resample to grid x grid tokens, so all variants can get the same visual-token
budget), `trainable` (False: frozen encoders, eval mode, run under inference mode) and `norm`, applied to every
encoder (and layer) separately:
    "none"         raw features;
    "layernorm"    every token normalised over its channels, without affine parameters (`normalize_features`);
    "standardize"  every channel z-scored with fixed statistics measured once on calibration images;
    "whiten"       standardized, then ZCA-whitened (identity channel covariance on the calibration images).
The last two hold mllm/token_stats.py TokenStats buffers (in `token_stats`, saved in checkpoints), measured by
`calibrate` (LlavaModule does it at the start of the first stage, on the first training records, so the live and
the cached path measure the same statistics).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distill.encoders.base import Encoder
from distill.exported import StudentEncoder
from mllm.fusion import ChannelFusion, Fusion, build_fusion
from mllm.token_stats import Moments, TokenStats


def resample_grid(dense: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resample a [B, C, h, w] map to `size`: adaptive average pooling when shrinking, bilinear otherwise."""
    if tuple(dense.shape[-2:]) == tuple(size):
        return dense
    if size[0] <= dense.shape[-2] and size[1] <= dense.shape[-1]:
        return F.adaptive_avg_pool2d(dense, size)
    return F.interpolate(dense, size=size, mode="bilinear", align_corners=False)


NORMS = ("none", "layernorm", "standardize", "whiten")
STATS_NORMS = ("standardize", "whiten")  # rules with statistics measured once (TokenStats)


def normalize_features(features: torch.Tensor, norm: str) -> torch.Tensor:
    """One encoder's features [..., C] under a stateless tower rule `norm`: "none" as they are, "layernorm" each
    token normalised over its C channels (zero mean, unit variance, eps 1e-6, no affine parameters). The rules with
    measured statistics ("standardize", "whiten") are the tower's TokenStats."""
    if norm == "none":
        return features
    if norm == "layernorm":
        return F.layer_norm(features, features.shape[-1:], eps=1e-6)
    raise ValueError(f"norm='{norm}' is unknown; use one of {NORMS}.")


class VisionTower(nn.Module):
    """Base class: subclasses set `dim`, `input_size`, `fusion` (a bound mllm.fusion.Fusion) and implement
    `features(images) -> [[B, L_i, N_i, C_i] per encoder]`."""

    dim: int
    input_size: tuple[int, int]
    fusion: Fusion

    def __init__(self, trainable: bool, norm: str = "none") -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"{type(self).__name__}: norm='{norm}' is unknown; use one of {NORMS}.")
        self.trainable = trainable
        self.norm = norm
        self._num_tokens: int | None = None
        self.token_stats: nn.ModuleList | None = None

    def _init_token_stats(self, parts: list[tuple[int, int]]) -> None:
        """One TokenStats per (part, layer) for the "standardize" / "whiten" rules; `parts` = (layers, channels) of
        each raw feature tensor, known from the encoders (or the cache file) before any image is seen."""
        if self.norm not in STATS_NORMS:
            return
        name = type(self).__name__
        self.token_stats = nn.ModuleList(
            nn.ModuleList(TokenStats(channels, self.norm == "whiten", f"{name}(norm='{self.norm}') part {i} layer {l}")
                          for l in range(layers))
            for i, (layers, channels) in enumerate(parts))

    @property
    def needs_calibration(self) -> bool:
        """True when the `norm` rule has statistics that were not measured (nor loaded) yet."""
        return self.token_stats is not None and not all(bool(s.calibrated) for part in self.token_stats for s in part)

    @torch.no_grad()
    def calibrate(self, batches) -> None:
        """Measure the "standardize" / "whiten" statistics from raw features: `batches` yields, per batch of
        calibration images, this tower's `features(...)` (one [B, L_i, N_i, C_i] per part)."""
        if self.token_stats is None:
            raise ValueError(f"{type(self).__name__}(norm='{self.norm}') has no statistics to calibrate; only norm "
                             f"{STATS_NORMS} measures them.")
        moments = [[Moments(s.channels) for s in part] for part in self.token_stats]
        for features in batches:
            if len(features) != len(moments):
                raise ValueError(f"{type(self).__name__}.calibrate: got {len(features)} feature parts, the tower has "
                                 f"{len(moments)}; pass the tower's own `features(images)`.")
            for part, part_moments in zip(features, moments):
                for layer, layer_moments in enumerate(part_moments):
                    layer_moments.add(part[:, layer])
        for part, part_moments in zip(self.token_stats, moments):
            for stats, layer_moments in zip(part, part_moments):
                stats.fit(layer_moments)

    def normalize(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """The `norm` rule applied to raw per-part features [B, L_i, N_i, C_i] (each part and layer separately)."""
        if self.token_stats is None:
            return [normalize_features(f, self.norm) for f in features]
        return [torch.stack([stats(f[:, layer]) for layer, stats in enumerate(part)], dim=1)
                for f, part in zip(features, self.token_stats)]

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Raw per-part features [B, L_i, N_i, C_i]: `features_from_maps` of every `encoder_layers` map."""
        plan = self.encoder_layers()
        if plan is None:
            raise NotImplementedError(f"{type(self).__name__} must define features() or encoder_layers()")
        return self.features_from_maps([encoder_maps(encoder, images, layers) for encoder, layers in plan])

    def encoder_layers(self) -> list[tuple[Encoder, list[int] | None]] | None:
        """(encoder, layers) whose dense maps make this tower's features (layers None: the encoder's own `layer`),
        or None where the features are not a function of dense maps alone (e.g. a kept CLS token)."""
        return None

    def features_from_maps(self, maps: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        """Raw per-part features from each `encoder_layers` entry's dense maps [B, C, h, w] (one per layer)."""
        raise NotImplementedError

    def fuse(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Tokens [B, N, dim] from raw per-encoder features: the `norm` rule, then the fusion module."""
        return self.fusion(self.normalize(features))

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.features(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.trainable:
            return self.tokens(images)
        with torch.inference_mode():
            features = self.features(images)
        # normal tensors: inference tensors cannot be saved for the fusion's / projector's backward
        return self.fuse([f.clone() for f in features])

    @property
    def num_tokens(self) -> int:
        """Tokens per image (measured once with a forward at the tower's input size)."""
        if self._num_tokens is None:
            parameter = next(self.parameters(), None)
            probe = torch.zeros(1, 3, *self.input_size, device=parameter.device if parameter is not None else "cpu")
            with torch.inference_mode():  # the norm rule keeps shapes (and may not be calibrated yet)
                self._num_tokens = int(self.fusion(self.features(probe)).shape[1])
        return self._num_tokens

    def _set_trainable(self, encoders: list[Encoder]) -> None:
        for encoder in encoders:
            if self.trainable:
                encoder.unfreeze()
            else:
                encoder.freeze()


def encoder_maps(encoder: Encoder, images: torch.Tensor, layers: list[int] | None) -> list[torch.Tensor]:
    """The encoder's dense maps [B, C, h, w] at `layers` (None: at its own `layer`): from one forward where the
    encoder has `dense_layers` (open_clip and timm read several blocks at once), else one forward per layer."""
    if layers is None:
        return [encoder(images).dense]
    if hasattr(encoder, "dense_layers") and len(layers) > 1:
        maps = encoder.dense_layers(images, list(layers))
    elif not hasattr(encoder, "layer"):
        raise ValueError(f"{type(encoder).__name__} has no `layer` setting, so a fusion cannot ask it for layers {layers}.")
    else:
        own, maps = encoder.layer, []
        try:
            for layer in layers:
                encoder.layer = layer  # the encoder reads `layer` at every forward (forward_intermediates indices)
                maps.append(encoder(images).dense)
        finally:
            encoder.layer = own
    if len({m.shape[1] for m in maps}) > 1:
        raise ValueError(f"{type(encoder).__name__}: layers {layers} give different widths {[m.shape[1] for m in maps]}; "
                         "choose blocks of one width (e.g. not SAM's neck, layer -1, beside its blocks).")
    return maps


def stack_tokens(maps: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Dense maps [B, C, h, w] (one per layer) resampled to `size` -> tokens [B, L, size[0]*size[1], C]."""
    return torch.stack([resample_grid(m, size).flatten(2).transpose(1, 2) for m in maps], dim=1)


def _grid_size(grid: int | None, dense: torch.Tensor) -> tuple[int, int]:
    return tuple(dense.shape[-2:]) if grid is None else (grid, grid)


class SingleEncoderTower(VisionTower):
    """One encoder's dense features as tokens (row-major), optionally preceded by its CLS/summary token.

    Args:
        encoder: any distill Encoder (its `layer` picks the feature layer; LLaVA-1.5 uses -2).
        keep_cls: prepend the encoder's summary token (needs summary_dim == dense_dim, e.g. a ViT CLS).
        grid: resample the dense map to grid x grid tokens; None keeps the encoder's own grid.
        trainable: train the encoder too; False freezes it (eval mode, inference mode).
        norm: "none", "layernorm", "standardize" or "whiten" (see the module docstring).
    """

    def __init__(self, encoder: Encoder, keep_cls: bool = False, grid: int | None = None, trainable: bool = False,
                 norm: str = "none") -> None:
        super().__init__(trainable, norm)
        if keep_cls and encoder.summary_dim != encoder.dense_dim:
            raise ValueError(
                f"keep_cls=True needs a summary token as wide as the dense tokens, but {type(encoder).__name__} has "
                f"summary_dim={encoder.summary_dim} and dense_dim={encoder.dense_dim}; use keep_cls: false or a layer "
                "whose summary is the CLS token (e.g. layer: -2)."
            )
        self.encoder = encoder
        self.keep_cls = keep_cls
        self.grid = grid
        self.fusion = ChannelFusion()
        self.fusion.bind([encoder.dense_dim], grid)
        self.dim = encoder.dense_dim
        self.input_size = tuple(encoder.input_size)
        self._init_token_stats([(1, encoder.dense_dim)])
        self._set_trainable([encoder])

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        if not self.keep_cls:
            return super().features(images)
        out = self.encoder(images)
        if out.summary is None:
            raise ValueError(f"keep_cls=True but {type(self.encoder).__name__} returned no summary token.")
        tokens = self.features_from_maps([[out.dense]])[0][:, 0]
        return [torch.cat([out.summary[:, None], tokens], dim=1)[:, None]]

    def encoder_layers(self) -> list[tuple[Encoder, list[int] | None]] | None:
        return None if self.keep_cls else [(self.encoder, None)]

    def features_from_maps(self, maps: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        return [stack_tokens(maps[0], _grid_size(self.grid, maps[0][0]))]


class EnsembleTower(VisionTower):
    """Several encoders joined into one token sequence by a fusion module (mllm/fusion.py).

    fusion="channel" (default, as EAGLE / Prismatic): each dense map is resampled to a common grid and the
    maps are concatenated along channels -> [B, g*g, sum(C_i)]. fusion="sequence": each encoder's tokens
    follow one another -> [B, sum(N_i), sum(C_i)], every encoder in its own channel block (zeros elsewhere).
    Trainable fusions (MouSi `expert_mlp`, BRAVE `resampler`, COMM `MultiLayerFusion`) train in both LLaVA
    stages with LlavaModule's `fusion_lr`, while the encoders stay frozen (unless `trainable`).

    Args:
        encoders: the distill Encoders (e.g. CLIP, DINOv2, SAM), in token/channel order.
        fusion: a registered name ("channel", "sequence", "expert_mlp", "resampler") or an mllm.fusion.Fusion
            (class_path/init_args in YAML, e.g. mllm.fusion.MultiLayerFusion with its `layers`).
        grid: token grid side; None = the smallest grid among the encoders (channel, multilayer) or each own
            grid (sequence, expert_mlp). The resampler reads its `input_grid` and returns grid*grid queries.
        trainable: train the encoders too; False freezes them.
        norm: "none", "layernorm", "standardize" or "whiten" (see the module docstring), applied to each encoder
            (and layer) separately.
    """

    def __init__(
        self,
        encoders: list[Encoder],
        fusion: Fusion | str = "channel",
        grid: int | None = None,
        trainable: bool = False,
        norm: str = "none",
    ) -> None:
        super().__init__(trainable, norm)
        if not encoders:
            raise ValueError("EnsembleTower needs at least one encoder in `encoders`.")
        self.encoders = nn.ModuleList(encoders)
        self.fusion = build_fusion(fusion)
        if self.fusion.layers is not None and len(self.fusion.layers) != len(encoders):
            raise ValueError(f"EnsembleTower: the fusion asks for layers of {len(self.fusion.layers)} encoders but "
                             f"{len(encoders)} are given; give one `layers` entry per encoder.")
        self.grid = grid
        self.dims = [encoder.dense_dim for encoder in encoders]
        self.fusion.bind(self.dims, grid)
        self.dim = self.fusion.dim
        self.input_size = tuple(encoders[0].input_size)
        layers = self.fusion.layers or [[None]] * len(encoders)
        self._init_token_stats([(len(chosen), dim) for chosen, dim in zip(layers, self.dims)])
        self._set_trainable(list(encoders))

    def encoder_layers(self) -> list[tuple[Encoder, list[int] | None]] | None:
        return list(zip(self.encoders, self.fusion.layers or [None] * len(self.encoders)))

    def features_from_maps(self, maps: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        sizes = self.fusion.input_sizes(self.grid, [tuple(m[0].shape[-2:]) for m in maps])
        return [stack_tokens(m, size) for m, size in zip(maps, sizes)]


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
        norm: "none", "layernorm", "standardize" or "whiten" (see the module docstring).
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
        norm: str = "none",
    ) -> None:
        super().__init__(StudentEncoder(path, layer=layer, adaptors=adaptors, image_size=image_size), keep_cls, grid,
                         trainable, norm)
