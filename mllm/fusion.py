"""Fusion modules: several frozen encoders' features -> one visual-token sequence [B, N, dim] for the projector.

A fusion sits between the encoders (frozen, run under inference mode) and the LLaVA projector, and trains in
both LLaVA stages with its own learning rate (LlavaModule `fusion_lr`). Its input is one tensor per encoder,
[B, L_i, N_i, C_i]: L_i layers (1 unless the fusion asks for several through `layers`) of N_i tokens of width
C_i, already resampled by the tower to the grid the fusion asks for (`input_sizes`) and normalised by the
tower's rule (mllm/towers.py `normalize_features`).

    fusion = build_fusion("resampler")                  # or ResamplerFusion(num_queries=4, depth=2)
    fusion.bind(dims=[64, 96], grid=2)                  # the tower calls this once it knows its encoders
    tokens = fusion([clip_features, dino_features])     # [B, 4, fusion.dim]

    channel     EAGLE (arXiv 2408.15998): concatenation along channels on a common grid (no parameters)
    sequence    each encoder's tokens after one another, each in its own channel block (no parameters)
    expert_mlp  MouSi (arXiv 2401.17221): one MLP per encoder (expert), outputs after one another
    resampler   BRAVE's MEQ-Former (arXiv 2404.07204): K learned queries cross-attend to every encoder's tokens
    multilayer  COMM (arXiv 2310.08825): several layers per encoder, Linear+LayerNorm each, learned merge weights

Model code only: no Lightning.
"""

from __future__ import annotations

import torch
from torch import nn


class Fusion(nn.Module):
    """Base class. Subclasses create their parameters in `bind` (the encoders' widths are known only to the
    tower) and set `dim`, the width of the tokens they return.

    Attributes read by the tower:
        layers: per encoder, the block indices whose features it needs (None: the encoder's own `layer`).
        common_grid: True when every encoder's map must be resampled to one grid (the tower's `grid`, else the
            smallest encoder grid); False: the tower's `grid` if set, else each encoder's own grid.
    """

    dim: int
    layers: list[list[int]] | None = None
    common_grid: bool = True

    def bind(self, dims: list[int], grid: int | None) -> None:
        """Create the parameters for encoders of widths `dims`; `grid` is the tower's token grid (or None)."""
        self.dims = list(dims)
        self.dim = sum(dims)

    def input_sizes(self, grid: int | None, sizes: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The (h, w) each encoder's map [B, C, h_i, w_i] (own sizes `sizes`) is resampled to before fusion."""
        if self.common_grid:
            common = (grid, grid) if grid else (min(s[0] for s in sizes), min(s[1] for s in sizes))
            return [common] * len(sizes)
        return [(grid, grid) if grid else tuple(s) for s in sizes]

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


def _last_layer(features: list[torch.Tensor]) -> list[torch.Tensor]:
    return [f[:, -1] for f in features]


class ChannelFusion(Fusion):
    """EAGLE / Prismatic: every encoder's map on one common grid, concatenated along channels ->
    [B, g*g, sum(C_i)]. EAGLE found this as good as its more complex mixers at equal token counts. No parameters:
    the LLaVA projector's first layer is the only mixing (as in EAGLE, whose MLP projector follows the concat)."""

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(_last_layer(features), dim=-1)


class SequenceFusion(Fusion):
    """Each encoder's tokens follow one another -> [B, sum(N_i), sum(C_i)], every encoder in its own channel
    block (zeros elsewhere), so the projector's first linear layer acts as a separate projection per encoder.
    No parameters."""

    common_grid = False

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        blocks, offset = [], 0
        for tokens in _last_layer(features):
            blocks.append(nn.functional.pad(tokens, (offset, self.dim - offset - tokens.shape[-1])))
            offset += tokens.shape[-1]
        return torch.cat(blocks, dim=1)


def _mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


class ExpertMLPFusion(Fusion):
    """MouSi's MLP fusion network (arXiv 2401.17221, "poly-expert fusion"): each encoder (expert) has its own
    two-layer MLP (Linear, GELU, Linear, as LLaVA-1.5's projector) and the experts' projected tokens are
    concatenated along the sequence -> [B, sum(N_i), width].

    Deviation: in MouSi the per-expert MLPs map straight into the LM's embedding space; here they map to
    `width` and the LLaVA projector (shared by every tower in the study) follows, so all variants keep the same
    projector. Positional-encoding tricks MouSi uses against long sequences are not reproduced.

    Args:
        width: output width of every expert MLP; None = the widest encoder's width.
    """

    common_grid = False

    def __init__(self, width: int | None = None) -> None:
        super().__init__()
        self.width = width

    def bind(self, dims: list[int], grid: int | None) -> None:
        self.dims = list(dims)
        self.dim = self.width or max(dims)
        self.experts = nn.ModuleList(_mlp(d, self.dim) for d in dims)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([expert(tokens) for expert, tokens in zip(self.experts, _last_layer(features))], dim=1)


class ResamplerFusion(Fusion):
    """BRAVE's multi-encoder querying transformer (MEQ-Former, arXiv 2404.07204): every encoder's tokens are
    linearly projected to one width and concatenated along the sequence; K learned queries pass through
    `depth` transformer decoder layers (self-attention among the queries, cross-attention to all encoders'
    tokens, MLP) -> [B, K, width], K tokens whatever the number of encoders.

    Deviations: BRAVE's MEQ-Former is a BLIP-2 Q-Former (BERT-base, 12 layers, post-norm, cross-attention
    every other layer, 32 queries) that also reads the text prompt; here it is torch's nn.TransformerDecoder
    (pre-norm, cross-attention in every layer, no dropout so cached and live runs match), small, and without
    the prompt (the prompt is not known to the tower). K defaults to the tower's token budget (grid*grid).

    Args:
        num_queries: K output tokens; None = grid * grid of the tower (the study's common budget).
        width: query and memory width; None = the widest encoder's width (must be divisible by `heads`).
        depth: decoder layers.
        heads: attention heads.
        input_grid: grid every encoder's map is resampled to before the cross-attention; None = each encoder's own
            grid (all its tokens, as BRAVE).
    """

    common_grid = False

    def __init__(self, num_queries: int | None = None, width: int | None = None, depth: int = 2, heads: int = 4,
                 input_grid: int | None = None) -> None:
        super().__init__()
        self.num_queries, self.width, self.depth, self.heads, self.input_grid = num_queries, width, depth, heads, input_grid

    def bind(self, dims: list[int], grid: int | None) -> None:
        self.dims = list(dims)
        self.dim = self.width or max(dims)
        if self.dim % self.heads:
            raise ValueError(f"ResamplerFusion: width {self.dim} is not divisible by heads={self.heads}; set `width` "
                             "or `heads` so that heads divides width.")
        count = self.num_queries or (grid * grid if grid else None)
        if not count:
            raise ValueError("ResamplerFusion needs num_queries, or a tower `grid` (K = grid * grid).")
        self.inputs = nn.ModuleList(nn.Linear(d, self.dim) for d in dims)
        self.queries = nn.Parameter(torch.randn(count, self.dim) * 0.02)
        layer = nn.TransformerDecoderLayer(self.dim, self.heads, dim_feedforward=4 * self.dim, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, self.depth, norm=nn.LayerNorm(self.dim))

    def input_sizes(self, grid: int | None, sizes: list[tuple[int, int]]) -> list[tuple[int, int]]:
        return [(self.input_grid, self.input_grid) if self.input_grid else tuple(s) for s in sizes]

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        memory = torch.cat([project(tokens) for project, tokens in zip(self.inputs, _last_layer(features))], dim=1)
        return self.decoder(self.queries.expand(len(memory), -1, -1), memory)


class MultiLayerFusion(Fusion):
    """COMM (arXiv 2310.08825, "From CLIP to DINO"): for each encoder, the features of several layers, each
    through Linear + LayerNorm ("LLN"), merged by learned weights (LLN-Layerscale: z = sum_j w_j LLN_j(z_j));
    optionally (COMM's DINOv2 branch) the merged features through an MLP to align them with the others; the
    encoders' results are concatenated along channels on a common grid -> [B, g*g, sum(width_i)].

    Deviations: the merge weights are a softmax of learned logits (start uniform, always sum to 1, as COMM's
    Layerscale weights); COMM uses every CLIP layer and DINOv2's deep layers, here `layers` chooses them (the
    tower runs an encoder once per chosen layer, stopping early: more encoder compute than one pass with several
    outputs, the same features).

    Args:
        layers: per encoder (in the tower's order), the block indices to merge, e.g. [[-1, -2, -4, -6], [-1, -2]].
        width: output width of each LLN; None = each encoder's own width.
        mlp: per encoder, whether its merged features go through an MLP (COMM: only the DINO branch); None = none.
    """

    def __init__(self, layers: list[list[int]], width: int | None = None, mlp: list[bool] | None = None) -> None:
        super().__init__()
        if not layers or any(not chosen for chosen in layers):
            raise ValueError(f"MultiLayerFusion: `layers` must list at least one block per encoder, got {layers}.")
        self.layers = [list(chosen) for chosen in layers]
        self.width = width
        self.mlp = list(mlp) if mlp is not None else [False] * len(layers)

    def bind(self, dims: list[int], grid: int | None) -> None:
        if len(dims) != len(self.layers) or len(self.mlp) != len(self.layers):
            raise ValueError(f"MultiLayerFusion: {len(dims)} encoders but `layers` has {len(self.layers)} entries and "
                             f"`mlp` {len(self.mlp)}; give one entry per encoder, in the tower's order.")
        self.dims = list(dims)
        widths = [self.width or d for d in dims]
        self.dim = sum(widths)
        self.lln = nn.ModuleList(
            nn.ModuleList(nn.Sequential(nn.Linear(d, w), nn.LayerNorm(w)) for _ in chosen)
            for d, w, chosen in zip(dims, widths, self.layers))
        # merge logits only where there is something to merge: one layer's weight would be a constant 1
        self.merge = nn.ParameterDict({str(i): nn.Parameter(torch.zeros(len(chosen)))
                                       for i, chosen in enumerate(self.layers) if len(chosen) > 1})
        self.branch_mlp = nn.ModuleList(_mlp(w, w) if on else nn.Identity() for w, on in zip(widths, self.mlp))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        merged = []
        for i, (stack, lln, mlp) in enumerate(zip(features, self.lln, self.branch_mlp)):
            weights = self.merge[str(i)].softmax(0) if str(i) in self.merge else stack.new_ones(1)
            mixed = sum(w * layer_norm(stack[:, j]) for j, (w, layer_norm) in enumerate(zip(weights, lln)))
            merged.append(mlp(mixed))
        return torch.cat(merged, dim=-1)


FUSIONS: dict[str, type[Fusion]] = {
    "channel": ChannelFusion,
    "sequence": SequenceFusion,
    "expert_mlp": ExpertMLPFusion,
    "resampler": ResamplerFusion,
}


def build_fusion(fusion: Fusion | str) -> Fusion:
    """A Fusion instance as given, or a fresh one of the registered name (default arguments)."""
    if isinstance(fusion, Fusion):
        return fusion
    if fusion not in FUSIONS:
        raise ValueError(f"fusion '{fusion}' is unknown; use one of {sorted(FUSIONS)} or a class_path config of an "
                         "mllm.fusion.Fusion (e.g. mllm.fusion.MultiLayerFusion with its `layers`).")
    return FUSIONS[fusion]()
