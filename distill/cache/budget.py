"""Fit a teacher's codec to a byte budget *on disk*, where the stored codes are zlib-compressed.

The PCA codes are not uniformly distributed (4-bit levels of half-whitened coefficients cluster near 0), so
zlib stores them in less space: measured on random-init DINOv2-S / open_clip ViT-B/16 maps at 224 px, 15% less
(DINOv2-S: 39,168 -> 33,134 bytes per image); on the toy teachers' 8x8 maps 7%. Compression is lossless, so
the saved bytes buy more PCA components at the same budget.

    codec, stored = fit_compressed(calibration_tokens, bytes_per_token=30.5, tokens_per_view=256)

`fit_compressed` fits `PcaCodec.fit_within` at a raw budget, measures the compressed bytes per token on the
calibration tokens (compressed one view's worth of tokens at a time, as the cache stores them), and rescales
the raw budget by the measured ratio until the compressed size fits (a few rounds). The bytes are an average
over the calibration views: one image may take a little more, the cache's total does not.
"""

from __future__ import annotations

import zlib

import torch

from distill.cache.codec import PcaCodec

ZLIB_LEVEL = 9


def codes_bytes(codec: PcaCodec, tokens: torch.Tensor) -> bytes:
    """The stored bytes of [N, C] tokens: codes then fp16 scales (distill/cache/layout.py's order)."""
    q, scale = codec.encode(tokens)
    return q.contiguous().numpy().tobytes() + scale.to(torch.float16).contiguous().numpy().tobytes()


def compressed_bytes_per_token(codec: PcaCodec, tokens: torch.Tensor, tokens_per_view: int) -> float:
    """Mean zlib-compressed bytes per token, compressing `tokens_per_view` rows at a time."""
    total = sum(len(zlib.compress(codes_bytes(codec, tokens[i:i + tokens_per_view]), ZLIB_LEVEL))
                for i in range(0, len(tokens), tokens_per_view))
    return total / len(tokens)


def fit_compressed(tokens: torch.Tensor, bytes_per_token: float, tokens_per_view: int,
                   rounds: int = 8) -> tuple[PcaCodec, float]:
    """(codec, its compressed bytes per token): the codec with the largest raw budget found whose compressed
    codes fit in `bytes_per_token` on `tokens` (see the module docstring). The raw budget is first scaled by
    the measured compression, then bisected between the largest that fits and the smallest that does not."""
    fits: dict[int, tuple[PcaCodec, float]] = {}
    over: set[int] = set()

    def trial(raw: int) -> float:
        codec = PcaCodec.fit_within(tokens, raw)
        stored = compressed_bytes_per_token(codec, tokens, tokens_per_view)
        (fits.__setitem__(raw, (codec, stored)) if stored <= bytes_per_token else over.add(raw))
        return stored

    raw = max(4, int(bytes_per_token))
    stored = trial(raw)
    for _ in range(rounds - 1):
        lo = max(fits, default=None)
        hi = min((r for r in over if lo is None or r > lo), default=None)
        if lo is None:  # even the raw budget overshoots (incompressible codes + zlib's header): go down
            raw = max(4, min(over) - max(1, int(min(over) * (1 - bytes_per_token / stored))))
            if raw in over:
                break
        elif hi is None:  # scale up by the compression just measured
            raw = max(lo + 1, int(lo * bytes_per_token / fits[lo][1]))
        elif hi - lo > 1:
            raw = (lo + hi) // 2
        else:
            break
        stored = trial(raw)
    if not fits:
        codec = PcaCodec.fit_within(tokens, max(4, int(bytes_per_token)))
        return codec, compressed_bytes_per_token(codec, tokens, tokens_per_view)
    return fits[max(fits)]
