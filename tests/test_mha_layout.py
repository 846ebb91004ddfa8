"""distill/encoders/mha_layout.py: under CPU bf16 autocast, nn.MultiheadAttention(batch_first=True) receives its
input with sequence-first strides (so its own transpose is contiguous and the in-projection stays on the fast
kernel); same values, same outputs; nothing changes outside autocast."""

import torch
from torch import nn

from distill.encoders import OpenClipEncoder
from distill.encoders.mha_layout import use_seq_first_layout


def _capture(module: nn.MultiheadAttention, seen: list) -> None:
    module.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0]), with_kwargs=True)


def test_hook_gives_seq_first_strides_under_cpu_autocast_only():
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    plain = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    plain.load_state_dict(attn.state_dict())
    assert use_seq_first_layout(nn.Sequential(attn, nn.MultiheadAttention(16, 2))) == 1  # batch_first ones only
    seen = []
    _capture(attn, seen)
    x = torch.randn(3, 5, 16)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x, x, x, need_weights=False)[0]
        ref = plain(x, x, x, need_weights=False)[0]
    assert seen[0].shape == (3, 5, 16) and torch.equal(seen[0], x)
    assert seen[0].transpose(0, 1).is_contiguous() and not x.transpose(0, 1).is_contiguous()
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)  # bf16 rounding only
    with torch.inference_mode():  # no autocast: the input goes through untouched (fp32 fast path as before)
        attn(x, x, x, need_weights=False)
    assert seen[1] is x
    y = torch.randn(3, 5, 16)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):  # cross-attention: untouched
        attn(x, y, y, need_weights=False)
    assert seen[2] is x


def test_open_clip_encoder_blocks_get_the_layout_and_same_features(tiny_teacher_files):
    enc = OpenClipEncoder(f"local-dir:{tiny_teacher_files['clip']}").eval()
    blocks = [m for m in enc.modules() if isinstance(m, nn.MultiheadAttention)]
    assert blocks and all(m._forward_pre_hooks for m in blocks)
    seen = []
    _capture(blocks[0], seen)
    images = torch.rand(2, 3, 40, 40)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        hooked = enc(images)
    assert seen[0].transpose(0, 1).is_contiguous()
    for m in blocks:
        m._forward_pre_hooks.clear()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        unhooked = enc(images)
    torch.testing.assert_close(hooked.dense.float(), unhooked.dense.float(), atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(hooked.summary.float(), unhooked.summary.float(), atol=5e-2, rtol=5e-2)
