"""Exact FLOPs (mllm/study/cost.py) against hand counts of a timm ViT and an open_clip ViT.

Convention (torch.utils.flop_counter's): FLOPs = 2 x multiply-accumulates of matrix products and
convolutions only. For a ViT with N tokens of width D, MLP width M, per image:
    patch embed  2 * P * (3 p^2) * D         (P patches of p x p pixels; a conv == a matmul per patch)
    per layer    qkv 2*N*D*3D + scores 2*N*N*D + attn.v 2*N*N*D + proj 2*N*D*D + mlp 2*N*D*M * 2
    head         open_clip: proj 2*D*E on the pooled token; timm with num_classes=0: none
"""

from __future__ import annotations

import open_clip
import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from mllm.study.cost import count_flops, gflops_per_image


def hand_vit_flops(image: int, patch: int, width: int, depth: int, mlp: int, prefix_tokens: int, proj_dim: int = 0) -> int:
    patches = (image // patch) ** 2
    n = patches + prefix_tokens
    patch_embed = 2 * patches * 3 * patch * patch * width
    qkv, scores, attn_v = 2 * n * width * 3 * width, 2 * n * n * width, 2 * n * n * width
    proj, mlp_flops = 2 * n * width * width, 2 * n * width * mlp * 2
    head = 2 * width * proj_dim
    return patch_embed + depth * (qkv + scores + attn_v + proj + mlp_flops) + head


@torch.inference_mode()
def old_count(model, images) -> int:
    """The counter as the study used it before: plain FlopCounterMode (fast paths on)."""
    with FlopCounterMode(display=False) as counter:
        model(images)
    return counter.get_total_flops()


def test_timm_vit_flops_match_the_hand_count():
    model = timm.create_model("vit_small_patch16_224", img_size=64, patch_size=8, embed_dim=96, depth=2,
                              num_heads=3, num_classes=0, reg_tokens=2).eval()
    images = torch.rand(2, 3, 64, 64)
    hand = hand_vit_flops(64, 8, 96, 2, 384, prefix_tokens=1 + 2)
    total, per_op = count_flops(model, images)
    assert total == 2 * hand
    assert per_op["aten.bmm"] == 2 * 2 * (2 * 2 * 67 * 67 * 96)  # images x layers x (scores + attn.v)
    assert gflops_per_image(model, images) == pytest.approx(hand / 1e9)
    assert old_count(model, images) < total  # CPU flash attention is invisible to the plain counter


def test_open_clip_vit_flops_match_the_hand_count():
    clip = open_clip.CLIP(
        embed_dim=32,
        # 4 heads: nn.MultiheadAttention's fast path needs an even head count (3 heads would not take it)
        vision_cfg={"image_size": 64, "patch_size": 8, "width": 128, "layers": 2, "head_width": 32, "mlp_ratio": 4.0},
        text_cfg={"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    )
    visual = clip.visual.eval()
    images = torch.rand(3, 3, 64, 64)
    hand = hand_vit_flops(64, 8, 128, 2, 512, prefix_tokens=1, proj_dim=32)
    total, per_op = count_flops(visual, images)
    assert total == 3 * hand
    assert per_op["aten.mm"] == 3 * 2 * 128 * 32  # the final projection of the pooled token
    # the plain counter misses the whole fused fast path (qkv, attention, out-proj): it sees patch embed,
    # MLPs and the final projection only
    n = 65
    assert old_count(visual, images) == 3 * (2 * 64 * 3 * 64 * 128 + 2 * (2 * n * 128 * 512 * 2) + 2 * 128 * 32)
    assert torch.backends.mha.get_fastpath_enabled()  # the counter restores the global switch
