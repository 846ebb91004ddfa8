"""Fit a teacher's codec to a byte budget *on disk*, where the stored codes are zlib-compressed.

The PCA codes are not uniformly distributed (4-bit levels of half-whitened coefficients cluster near 0), so
zlib stores them in less space: measured on random-init DINOv2-S / open_clip ViT-B/16 maps at 224 px, 15% less
(DINOv2-S: 39,168 -> 33,134 bytes per image); on the toy teachers' 8x8 maps 7%. Compression is lossless, so
the saved bytes buy more PCA components at the same budget.

    codec, stored = fit_compressed(calibration_tokens, bytes_per_token=30.5, tokens_per_view=256)
    codecs = allocate({"clip": (clip_tokens, 30.5, 256), "sam": (sam_tokens, 20.0, 4096)})   # one shared budget

`fit_compressed` fits `PcaCodec.fit_within` at a raw budget, measures the compressed bytes per token on the
calibration tokens (compressed one view's worth of tokens at a time, as the cache stores them), and rescales
the raw budget by the measured ratio until the compressed size fits (a few rounds). The bytes are an average
over the calibration views: one image may take a little more, the cache's total does not.

`allocate` spends the teachers' budgets together: the goal is the cache's total bytes, so bytes move from a
teacher that reconstructs easily (the toy SAM: 0.999 at its share) to one that does not (the toy CLIP). Each
teacher is fitted at several shares of its own budget; the combination within the summed budget with the
highest lowest calibration cosine (then the highest sum) wins.
"""

from __future__ import annotations

import itertools
import math
import zlib

import torch

from distill.cache.codec import PcaCodec, pca, token_cosines
from distill.cache.layout import TAR_RESERVE

ZLIB_LEVEL = 9
SHARES = (0.6, 0.75, 0.9, 1.0, 1.15, 1.3, 1.5)  # fractions of a teacher's own budget `allocate` tries


def per_token_budget(max_ratio: float, theia_view: float, teachers: int, views: int, summary_dim: int | None,
                     tokens_per_view: int) -> tuple[float, bool]:
    """(bytes per token, whether the tar overhead had to be left out) for one teacher's codes: `max_ratio` of
    its Theia bf16 bytes per image, less its share of a `.tgt` member's overhead (TAR_RESERVE over the
    teachers), split over the `views` stored per image, less its fp16 summary. Maps so small that the overhead
    alone exceeds the budget get the payload's budget (at least 4 bytes per token), flagged True."""
    budget = (max_ratio * theia_view - TAR_RESERVE / teachers) / views - 2 * (summary_dim or 0)
    if budget / tokens_per_view >= 4:
        return budget / tokens_per_view, False
    return max(4.0, (max_ratio * theia_view / views - 2 * (summary_dim or 0)) / tokens_per_view), True


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
                   rounds: int = 8, fitted: tuple | None = None) -> tuple[PcaCodec, float]:
    """(codec, its compressed bytes per token): the codec with the largest raw budget found whose compressed
    codes fit in `bytes_per_token` on `tokens` (see the module docstring). The raw budget is first scaled by
    the measured compression, then bisected between the largest that fits and the smallest that does not.
    `fitted`: `pca(tokens)` if already computed."""
    fitted = fitted if fitted is not None else pca(tokens)
    fits: dict[int, tuple[PcaCodec, float]] = {}
    over: set[int] = set()

    def trial(raw: int) -> float:
        codec = PcaCodec.fit_within(tokens, raw, fitted)
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
        codec = PcaCodec.fit_within(tokens, max(4, int(bytes_per_token)), fitted)
        return codec, compressed_bytes_per_token(codec, tokens, tokens_per_view)
    return fits[max(fits)]


def allocate(teachers: dict[str, tuple[torch.Tensor, float, int]], shares: tuple[float, ...] = SHARES,
             max_combinations: int = 100_000) -> dict[str, PcaCodec]:
    """{teacher: codec} within the teachers' summed budget (see the module docstring).

    Args:
        teachers: {name: (calibration tokens [N, C], its budget in bytes per token, tokens per view)}.
        shares: the fractions of each teacher's budget tried (1.0 must be among them: the equal split always fits).
        max_combinations: above this many combinations every teacher keeps its own budget.
    """
    if 1.0 not in shares:
        raise ValueError(f"allocate: shares must include 1.0 (each teacher's own budget), got {shares}")
    names = list(teachers)
    if math.prod([len(shares)] * len(names)) > max_combinations:
        shares = (1.0,)
    options: dict[str, list[tuple[float, float, PcaCodec]]] = {}
    for name, (tokens, per_token, per_view) in teachers.items():
        options[name] = []
        fitted = pca(tokens)
        for share in shares:
            codec, stored = fit_compressed(tokens, per_token * share, per_view, fitted=fitted)
            cos = float(token_cosines(codec.decode(*codec.encode(tokens)), tokens).mean())
            options[name].append((stored * per_view, cos, codec))
    total = sum(per_token * per_view for _, per_token, per_view in teachers.values())
    equal = shares.index(1.0)
    even = tuple(equal for _ in names)  # every teacher at its own budget: allowed even if zlib overshot
    best, best_key = even, None
    for combo in itertools.product(range(len(shares)), repeat=len(names)):
        size = sum(options[n][i][0] for n, i in zip(names, combo))
        if size > total * (1 + 1e-9) and combo != even:
            continue
        cosines = [options[n][i][1] for n, i in zip(names, combo)]
        key = (min(cosines), sum(cosines))
        if best_key is None or key > best_key:
            best, best_key = combo, key
    return {n: options[n][i][2] for n, i in zip(names, best)}
