"""The distilled student (mllm.towers.StudentTower) as a transformers-native vision model for the LLaVA export
(mllm/hf_export.py): a Dinov2Model that computes the student's tokens exactly.

    vision = student_vision_export(tower)   # {config: Dinov2Config, state, feature_layer, select_strategy, preprocess}

Why Dinov2Model and not TimmWrapperModel: transformers' LlavaForConditionalGeneration reads
`vision_tower(...).hidden_states[vision_feature_layer]` as [batch, tokens, channels] and its strategies drop
exactly one leading token ("default") or none ("full"). TimmWrapperModel's hidden states come from timm
`forward_intermediates` in NCHW layout without prefix tokens (tests/test_hf_export.py checks this still holds),
so Llava would project along the wrong axis. The student's backbone is a plain timm ViT (pre-norm blocks, class
token, absolute position embedding, GELU MLP, optional layer scale), which is Dinov2's architecture: the weights
map one to one (fused qkv split into q/k/v, layer scale 1 where timm has none), and Dinov2's hidden states are the
block outputs before the final norm, as the student's `layer` < -1 reads them.

What is honoured: the input conditioner (mean/std go into the processor, which normalizes as the student does),
the position embedding at the tower's input grid (with CPE: the eval-mode centre window; otherwise timm's own
resampling to that grid, computed once, so Dinov2 never interpolates), the feature layer (`layer` ->
vision_feature_layer), the summary/prefix tokens (dropped by the "default" strategy; keep_cls -> "full"), the
token grid (the tower's own grid only).

Refused with an ExportError that says why:
- more than one prefix token (several summary tokens or registers, e.g. the toy and RADIO recipes'
  summary_names [clip, dino] + registers): Llava drops at most one leading token, and the student's patch tokens
  attend to all its prefix tokens, so no equivalent one-prefix model exists; distill a student with one summary
  token and num_registers 0 to export it;
- layer -1 (the final normalized tokens): Dinov2's hidden states are taken before its final layernorm;
  train the LLaVA with layer: -2 (the study's choice);
- adaptors (features in a teacher's space): the adaptor heads (MLPs on the tokens, concatenated per teacher) have
  no place between transformers' vision model and its projector;
- a `grid` other than the student's own (pooling / resampling the token map) and timm blocks Dinov2 lacks
  (qk-norm, a norm before the blocks, no class token, position embedding without the class token).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ExportError(ValueError):
    """The checkpoint holds something transformers' LlavaForConditionalGeneration cannot express without remote code
    (raised here and by mllm/hf_export.py, which re-exports it)."""


def student_vision_export(tower: Any) -> dict:
    """{config, state, feature_layer, select_strategy, preprocess} of a StudentTower (see the module docstring)."""
    encoder = tower.encoder
    student = encoder.student
    vit = student.model
    what = f"StudentTower(layer={encoder.layer})"
    if encoder.adaptor_names:
        raise ExportError(
            f"{what} with adaptors {encoder.adaptor_names}: the tokens are the adaptor heads' outputs (MLPs on the "
            "backbone tokens, concatenated per teacher); transformers' Llava feeds the vision model's hidden states "
            "straight to its projector, so the heads have no place. Train the LLaVA on backbone features (adaptors: "
            "null) to export it.")
    if vit.num_prefix_tokens != 1:
        raise ExportError(
            f"{what}: the student has {vit.num_prefix_tokens} prefix tokens (summary tokens {student.summary_names} + "
            f"{student.num_registers} registers), but transformers' Llava drops at most one leading token "
            "(vision_feature_select_strategy 'default') and the patch tokens attend to every prefix token, so no "
            "transformers vision model it can run gives the same tokens. Export needs a student with one summary "
            "token and num_registers: 0; otherwise evaluate with `unitower llava evaluate` or mllm/lmms_eval.py.")
    num_blocks = len(vit.blocks)
    block = encoder.layer % num_blocks
    if block == num_blocks - 1:
        raise ExportError(
            f"{what}: the last layer's tokens pass through the final norm, but the hidden states transformers' Llava "
            "reads are taken before it (Dinov2Model, the student's transformers form). Train with layer: -2 (or "
            "another non-final block).")
    side = encoder.input_size[0]
    grid = side // student.patch_size
    if tower.grid is not None and tower.grid != grid:
        raise ExportError(
            f"{what}(grid={tower.grid}) resamples the student's {grid}x{grid} token map; transformers' Llava feeds "
            f"the vision model's tokens to the projector unchanged. Train with grid: null (or grid: {grid}).")
    _check_blocks(vit, what)
    config, state = _dinov2_weights(vit, side, student.patch_size)
    return {
        "config": config,
        "state": state,
        "feature_layer": block - num_blocks,  # hidden_states[0] is the embedding output, [i + 1] block i's output
        "select_strategy": "full" if tower.keep_cls else "default",
        "preprocess": {"mean": student.conditioner.mean, "std": student.conditioner.std, "interpolation": "bicubic"},
    }


def _check_blocks(vit: nn.Module, what: str) -> None:
    from timm.layers import LayerScale, Mlp
    from timm.models.vision_transformer import Block

    problems = []
    if vit.cls_token is None or vit.no_embed_class or vit.pos_embed is None:
        problems.append("a class token with its own position entry")
    if not isinstance(vit.norm_pre, nn.Identity):
        problems.append("no norm before the blocks")
    for index, blk in enumerate(vit.blocks):
        if (type(blk) is not Block or not isinstance(blk.attn.q_norm, nn.Identity)
                or not isinstance(blk.attn.k_norm, nn.Identity) or type(blk.mlp) is not Mlp
                or not isinstance(blk.mlp.norm, nn.Identity) or not isinstance(blk.mlp.act, nn.GELU)
                or blk.mlp.act.approximate != "none" or not isinstance(getattr(blk.attn, "norm", nn.Identity()), nn.Identity)
                or not all(isinstance(ls, (nn.Identity, LayerScale)) for ls in (blk.ls1, blk.ls2))
                or not isinstance(blk.norm1, nn.LayerNorm) or not isinstance(blk.norm2, nn.LayerNorm)):
            problems.append(f"block {index}: a plain pre-norm block (LayerNorm, qkv attention without qk-norm, "
                            "GELU MLP, optional layer scale)")
            break
    if problems:
        raise ExportError(f"{what}: Dinov2Model (the student's transformers form) needs {'; '.join(problems)}; "
                          f"this student's {type(vit).__name__} differs.")


def _position_embedding(vit: nn.Module, grid: int) -> torch.Tensor:
    """[1, 1 + grid*grid, C]: what the student adds at a grid x grid input in eval mode."""
    from timm.layers import resample_abs_pos_embed

    from distill.cpe import window_pos_embed

    if getattr(vit, "cpe_max_grid", None) is not None:
        return window_pos_embed(vit, grid, grid).detach()
    old = list(vit.patch_embed.grid_size)
    if old == [grid, grid]:
        return vit.pos_embed.detach()
    return resample_abs_pos_embed(vit.pos_embed, new_size=[grid, grid], old_size=old,
                                  num_prefix_tokens=vit.num_prefix_tokens).detach()


def _dinov2_weights(vit: nn.Module, side: int, patch: int) -> tuple[Any, dict[str, torch.Tensor]]:
    """(Dinov2Config, Dinov2Model state dict) computing `vit`'s eval-mode tokens at side x side inputs."""
    from transformers import Dinov2Config

    blocks = list(vit.blocks)
    dim = vit.embed_dim
    first = blocks[0]
    hidden = first.mlp.fc1.out_features
    if hidden % dim:
        raise ExportError(f"StudentTower: MLP width {hidden} is no multiple of the width {dim}; Dinov2Config's "
                          "mlp_ratio is an integer.")
    config = Dinov2Config(
        hidden_size=dim, num_hidden_layers=len(blocks), num_attention_heads=first.attn.num_heads,
        mlp_ratio=hidden // dim, hidden_act="gelu", layer_norm_eps=first.norm1.eps,
        image_size=side, patch_size=patch, num_channels=3, qkv_bias=first.attn.qkv.bias is not None,
        layerscale_value=1.0, use_swiglu_ffn=False,
    )
    state = {
        "embeddings.cls_token": vit.cls_token,
        "embeddings.mask_token": torch.zeros(1, dim),
        "embeddings.position_embeddings": _position_embedding(vit, side // patch),
        "embeddings.patch_embeddings.projection.weight": vit.patch_embed.proj.weight,
        "embeddings.patch_embeddings.projection.bias": vit.patch_embed.proj.bias,
        "layernorm.weight": vit.norm.weight,
        "layernorm.bias": vit.norm.bias,
    }
    for index, blk in enumerate(blocks):
        prefix = f"encoder.layer.{index}."
        q, k, v = blk.attn.qkv.weight.chunk(3)
        state.update({prefix + "norm1.weight": blk.norm1.weight, prefix + "norm1.bias": blk.norm1.bias,
                      prefix + "attention.q_proj.weight": q, prefix + "attention.k_proj.weight": k,
                      prefix + "attention.v_proj.weight": v,
                      prefix + "attention.o_proj.weight": blk.attn.proj.weight,
                      prefix + "attention.o_proj.bias": blk.attn.proj.bias,
                      prefix + "norm2.weight": blk.norm2.weight, prefix + "norm2.bias": blk.norm2.bias,
                      prefix + "mlp.fc1.weight": blk.mlp.fc1.weight, prefix + "mlp.fc1.bias": blk.mlp.fc1.bias,
                      prefix + "mlp.fc2.weight": blk.mlp.fc2.weight, prefix + "mlp.fc2.bias": blk.mlp.fc2.bias,
                      prefix + "layer_scale1.lambda1": _gamma(blk.ls1, dim),
                      prefix + "layer_scale2.lambda1": _gamma(blk.ls2, dim)})
        if blk.attn.qkv.bias is not None:
            qb, kb, vb = blk.attn.qkv.bias.chunk(3)
            state.update({prefix + "attention.q_proj.bias": qb, prefix + "attention.k_proj.bias": kb,
                          prefix + "attention.v_proj.bias": vb})
    return config, {key: value.detach().clone().float() for key, value in state.items()}


def _gamma(layer_scale: nn.Module, dim: int) -> torch.Tensor:
    return layer_scale.gamma if hasattr(layer_scale, "gamma") else torch.ones(dim)
