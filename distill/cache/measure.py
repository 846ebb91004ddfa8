"""What the teacher cache costs and loses, for a benchmark: bytes per image against Theia's layout and the
reconstruction cosine, on a batch of images (no files written).

    report = cache_report(teachers, images)   # images [N, 3, S, S] in [0, 1], N >= 2
    report["clip"] = {"theia_bytes": ..., "cache_bytes": ..., "ratio": ..., "components": 44, "bits": 4,
                      "dense_cos_mean": ..., "dense_cos_p1": ..., "summary_cos_min": ...}
    report["total"] = {"theia_bytes": ..., "cache_bytes": ..., "cache_bytes_on_disk": ..., "ratio": ..., "ratio_on_disk": ...}

The codecs are fitted on the first half of the images (as `build_cache` fits them on its calibration
images, with the same byte budget: `max_ratio` of Theia's bytes on disk for all teachers together, tar
overhead included, codes zlib-compressed as the cache stores them: distill/cache/budget.py) and the cosines and compressed bytes
are measured on the other half, per token (the 1st percentile is over all held-out tokens).
"""

from __future__ import annotations

import torch

from distill.cache.budget import allocate, compressed_bytes_per_token, per_token_budget
from distill.cache.codec import token_cosines
from distill.cache.layout import tar_member_bytes, teacher_bytes, theia_bytes


def _tokens(dense: torch.Tensor) -> torch.Tensor:
    return dense.flatten(2).transpose(1, 2).reshape(-1, dense.shape[1])


@torch.no_grad()
def cache_report(teachers: list, images: torch.Tensor, max_ratio: float = 0.2, batch_size: int = 8) -> dict:
    """Bytes per image (one view) and held-out reconstruction cosines per teacher (see the module docstring)."""
    if len(images) < 2:
        raise ValueError(f"cache_report needs at least 2 images (fit on one half, measure on the other); got {len(images)}.")
    half = len(images) // 2
    report: dict = {}
    cache_total, theia_total = 0, 0.0
    features, budgets = {}, {}
    for t in teachers:
        outs = [t.targets(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
        dense = torch.cat([o.dense for o in outs])
        summary = torch.cat([o.summary for o in outs]) if outs[0].summary is not None else None
        theia = sum(theia_bytes(None if summary is None else summary[i], dense[i]) for i in range(len(images))) / len(images)
        tokens_per_image = dense.shape[-2] * dense.shape[-1]
        per_token, _ = per_token_budget(max_ratio, theia, len(teachers), 1, t.encoder.summary_dim, tokens_per_image)
        features[t.name] = (dense, summary, theia)
        budgets[t.name] = (_tokens(dense[:half]), per_token, tokens_per_image)
    codecs = allocate(budgets)  # one budget for all teachers, as build_cache spends it
    for t in teachers:
        (dense, summary, theia), codec = features[t.name], codecs[t.name]
        tokens_per_image = dense.shape[-2] * dense.shape[-1]
        held = _tokens(dense[half:])
        cos = token_cosines(codec.decode(*codec.encode(held)), held)
        raw = teacher_bytes(None if summary is None else summary.shape[1], tokens_per_image, codec.bytes_per_token())
        # held-out images' codes compressed as the cache stores them (+ fp16 summaries, not compressed here)
        size = round(2 * (summary.shape[1] if summary is not None else 0)
                     + compressed_bytes_per_token(codec, held, tokens_per_image) * tokens_per_image)
        row = {"theia_bytes": theia, "cache_bytes": size, "raw_bytes": raw, "ratio": size / theia, "channels": dense.shape[1],
               "grid": list(dense.shape[-2:]), "components": codec.components, "bits": codec.bits,
               "head": codec.head, "alpha": codec.alpha,
               "dense_cos_mean": float(cos.mean()), "dense_cos_p1": float(torch.quantile(cos, 0.01)),
               "dense_cos_min": float(cos.min())}
        if summary is not None:
            row["summary_cos_min"] = float(token_cosines(summary.half().float(), summary).min())
        report[t.name] = row
        cache_total += size
        theia_total += theia
    report["total"] = {"theia_bytes": theia_total, "cache_bytes": cache_total,
                       "cache_bytes_on_disk": tar_member_bytes(cache_total), "ratio": cache_total / theia_total,
                       "ratio_on_disk": tar_member_bytes(cache_total) / theia_total}
    return report


def _layout(row: dict) -> str:
    head = f"{row['head']} int8 + {row['components'] - row['head']} 4-bit" if row.get("head") else f"{row['bits']}-bit"
    return f"{head}, alpha {row.get('alpha', 1.0):g}"


def format_report(report: dict) -> str:
    """One line per teacher for a benchmark's output."""
    lines = []
    for name, r in report.items():
        if name == "total":
            lines.append(f"cache total: {r['cache_bytes_on_disk']} B/image on disk vs Theia bf16 {r['theia_bytes']:.0f} B "
                         f"(ratio {r['ratio_on_disk']:.3f}; payload {r['ratio']:.3f})")
        else:
            lines.append(f"cache {name}: {r['cache_bytes']} B zlib ({r['raw_bytes']} B raw) vs Theia {r['theia_bytes']:.0f} B (ratio {r['ratio']:.3f}), "
                         f"k={r['components']} ({_layout(r)}) of C={r['channels']}, token cos mean {r['dense_cos_mean']:.4f} "
                         f"p1 {r['dense_cos_p1']:.4f}")
    return "\n".join(lines)


def step_times(module, cache_dir: str, image_size: int, batch_size: int = 32, steps: int = 10, num_workers: int = 1,
               rounds: int = 3, online: bool = True) -> dict:
    """Milliseconds per training step (forward, backward, AdamW step) of `module` (a DistillModule), measured
    in interleaved rounds of `steps` steps (the median round counts):

    - student_only: one batch (images + decoded cached targets) held in memory, no data loading;
    - cached: batches read from the cache by a DataLoader with `num_workers` workers (decode, crop, unpack);
    - online: the held batch's images with the teachers run in the step (if `online`).
    Returns {"student_only_ms", "cached_ms", "online_ms", "cached_vs_student_only", "cached_vs_online"}."""
    import statistics
    import time

    from distill.cache.dataset import CachedViews, collate_cached
    from distill.data.resumable import ResumableLoader

    module.log = lambda *a, **k: None  # no trainer attached
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    loader = ResumableLoader(CachedViews(cache_dir, image_size), batch_size, seed=0, num_workers=num_workers,
                             collate_fn=collate_cached)
    stream = iter(loader)
    held = next(stream)

    def step(images, targets):
        loss = module.teacher_losses(images, "train", targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def cached_batch():
        nonlocal stream
        try:
            return next(stream)
        except StopIteration:
            stream = iter(loader)
            return next(stream)

    kinds = {"student_only": lambda: step(held["images"], held["targets"]),
             "cached": lambda: (lambda b: step(b["images"], b["targets"]))(cached_batch())}
    if online:
        kinds["online"] = lambda: step(held["images"], None)
    for run in kinds.values():  # warm-up
        run()
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(rounds):
        for name, run in kinds.items():
            start = time.perf_counter()
            for _ in range(steps):
                run()
            times[name].append((time.perf_counter() - start) / steps * 1000)
    out = {f"{k}_ms": statistics.median(v) for k, v in times.items()}
    out["cached_vs_student_only"] = out["cached_ms"] / out["student_only_ms"]
    if online:
        out["cached_vs_online"] = out["cached_ms"] / out["online_ms"]
    return out
