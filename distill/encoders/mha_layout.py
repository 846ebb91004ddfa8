"""Give `nn.MultiheadAttention(batch_first=True)` its input in sequence-first memory under CPU autocast.

Under autocast, MultiheadAttention leaves its fused fast path and runs `F.multi_head_attention_forward`,
which first transposes a batch-first [B, L, E] input to [L, B, E] -- a non-contiguous view -- and feeds it
to the packed in-projection `linear`. On CPU a bf16 `linear` of such a strided 3-D input leaves oneDNN's
fast kernel: measured with torch 2.14.1 on an AMD EPYC (avx512_bf16), one thread, [4, 197, 768] x [768, 2304]:
contiguous 14 ms, transposed 1,084 ms (fp32: 33 vs 72 ms). That is why an open_clip ViT-B/16 (which uses
nn.MultiheadAttention) ran *slower* in bf16 than in fp32 at batch >= 2 while timm's ViTs ran faster.

The hook below stores the same values with sequence-first strides (`x.transpose(0, 1).contiguous()
.transpose(0, 1)`: still shape [B, L, E]), so MultiheadAttention's own transpose yields a contiguous
tensor. Values, shapes and the module's code are unchanged; it acts only on CPU under autocast with
query, key and value the same tensor (self-attention, the packed path), and costs one copy per block.

    use_seq_first_layout(open_clip_model.visual)    # every batch_first MultiheadAttention inside
"""

from __future__ import annotations

import torch
from torch import nn


def _seq_first(module: nn.MultiheadAttention, args: tuple, kwargs: dict):
    names = ("query", "key", "value")
    given = list(args[:3]) + [kwargs[n] for n in names[len(args[:3]):] if n in kwargs]
    if len(given) != 3 or not (given[0] is given[1] is given[2]):
        return None
    x = given[0]
    if x.device.type != "cpu" or x.dim() != 3 or not torch.is_autocast_enabled("cpu"):
        return None
    if x.transpose(0, 1).is_contiguous():
        return None
    x = x.transpose(0, 1).contiguous().transpose(0, 1)
    args = (x, x, x) + tuple(args[3:]) if len(args) >= 3 else (x,) * len(args)
    kwargs = {k: (x if k in names else v) for k, v in kwargs.items()}
    return args, kwargs


def use_seq_first_layout(model: nn.Module) -> int:
    """Register the layout hook on every batch-first nn.MultiheadAttention in `model`; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention) and module.batch_first:
            module.register_forward_pre_hook(_seq_first, with_kwargs=True)
            count += 1
    return count
