"""SAM's image encoder runs in chunks (distill/encoders/sam.py `chunk_size`): same features, bounded batch per call."""

from __future__ import annotations

import pytest
import torch

from distill.encoders import SamEncoder
from distill.encoders.sam import CPU_CHUNK_TOKENS, default_chunk_size


def calls_per_batch(encoder: SamEncoder) -> list[int]:
    sizes: list[int] = []
    encoder.image_encoder.patch_embed.register_forward_hook(lambda module, args, out: sizes.append(len(args[0])))
    return sizes


@pytest.mark.parametrize("layer", [-1, -2])
def test_chunked_sam_matches_one_call(layer):
    torch.manual_seed(0)
    whole = SamEncoder("tiny", layer=layer, chunk_size=8).freeze()
    chunked = SamEncoder("tiny", layer=layer, chunk_size=2).freeze()
    chunked.load_state_dict(whole.state_dict())
    images = torch.rand(5, 3, 48, 64)
    sizes_whole, sizes_chunked = calls_per_batch(whole), calls_per_batch(chunked)
    with torch.inference_mode():
        ref, out = whole(images), chunked(images)
    assert sizes_whole == [5] and sizes_chunked == [2, 2, 1]
    assert out.dense.shape == ref.dense.shape == (5, whole.dense_dim, 6, 8)
    torch.testing.assert_close(out.dense, ref.dense, atol=1e-5, rtol=1e-5)


def test_default_chunk_follows_the_token_budget_on_cpu():
    # SAM-B/L/H at 1024 px (64 x 64 tokens): one image per call on CPU; the tiny 64 px SAM: 64 images per call
    assert default_chunk_size(64 * 64, batch=4, device_type="cpu") == 1
    assert default_chunk_size(32 * 32, batch=8, device_type="cpu") == 4
    assert default_chunk_size(8 * 8, batch=100, device_type="cpu") == CPU_CHUNK_TOKENS // 64 == 64
    assert default_chunk_size(64 * 64, batch=4, device_type="cuda") == 4
    encoder = SamEncoder("tiny").freeze()
    sizes = calls_per_batch(encoder)
    with torch.inference_mode():
        encoder(torch.rand(70, 3, 64, 64))
    assert encoder.chunk_size is None and sizes == [64, 6]
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        SamEncoder("tiny", chunk_size=0)
