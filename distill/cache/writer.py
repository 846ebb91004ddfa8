"""Run the teachers once over a dataset and write their compressed outputs as webdataset shards.

    build_cache(teachers, source, "cache/toy", image_size=64, views=1, min_scale=0.5, hflip=True)

Output folder:
    meta.json                     teachers (summary_dim, dense grid, PCA components), image_size, views,
                                  crop settings, bytes per image (cache vs Theia's bf16 layout), calibration cosines
    codec-<teacher>.safetensors   the PCA basis of each teacher (mean [C], basis [C, k], std [k])
    shard-000000.tar ...          webdataset shards: <key>.png (the decoded image, lossless), <key>.json
                                  (its views: [top, left, height, width, flip] each), <key>.tgt (targets,
                                  distill/cache/layout.py, zlib-compressed: meta "compression")
    index.json                    per sample: shard, offsets and sizes of its png / tgt members, views
                                  (random access for training without scanning the tars)

The teachers run on `device` (e.g. "cuda"; `python -m distill cache --device`), the codecs on the CPU.
Each image gets `views` random-resized crops drawn like the training augmentation, seeded from
(seed, index) so a rebuild writes the same crops; the teachers see exactly the tensor the student will
get for that view. Images are decoded and cropped in DataLoader workers; the teachers run in this
process. The codecs are fitted on the first `calibration_images` images (their features are kept in
memory and written afterwards). Shards and JSON files are written atomically.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
import warnings
import zlib
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from distill.cache.budget import ZLIB_LEVEL, allocate, per_token_budget
from distill.cache.codec import PcaCodec, token_cosines
from distill.cache.layout import pack, tar_member_bytes, teacher_bytes, theia_bytes
from distill.cache.views import apply_view, draw_view
from distill.data.resumable import SeededSamples, SeededStream
from distill.data.sources import ImageSource
from distill.common.io import atomic_write, save_json
from distill.common.skips import Skipped

CACHE_VERSION = 1


class _ViewMaker:
    """Worker-side transform: PIL image -> {"png": bytes, "views": [...], "pixels": [K, 3, S, S]}."""

    def __init__(self, image_size: int, views: int, min_scale: float, hflip: bool) -> None:
        self.image_size, self.views, self.min_scale, self.hflip = image_size, views, min_scale, hflip

    def __call__(self, image: Image.Image) -> dict[str, Any]:
        views = [draw_view(image, self.min_scale, self.hflip) for _ in range(self.views)]
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return {"png": buf.getvalue(), "views": views,
                "pixels": torch.stack([apply_view(image, v, self.image_size) for v in views])}


def _collate(items: list) -> list:
    return items


def _run_teachers(teachers, pixels: torch.Tensor, device: torch.device) -> dict[str, tuple[torch.Tensor | None, torch.Tensor]]:
    """{teacher: (summary, dense)} of `pixels`, run on `device`; returned on the CPU (the codecs run there)."""
    out = {}
    pixels = pixels.to(device, non_blocking=True)
    for t in teachers:
        target = t.targets(pixels)
        out[t.name] = (None if target.summary is None else target.summary.cpu(), target.dense.cpu())
    return out


def _teacher_device(teachers) -> torch.device:
    """The device of the first teacher parameter or buffer (CPU for parameterless teachers)."""
    for t in teachers:
        for tensor in (*t.parameters(), *t.buffers()):
            return tensor.device
    return torch.device("cpu")


def _tokens(dense: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B * h * w, C]."""
    return dense.flatten(2).transpose(1, 2).reshape(-1, dense.shape[1])


def _store(data: bytes) -> bytes:
    """A `.tgt` member as written: the packed targets, zlib-compressed (meta.json "compression": "zlib")."""
    return zlib.compress(data, ZLIB_LEVEL)


def build_cache(
    teachers: list,
    source: ImageSource,
    out: str | Path,
    image_size: int,
    views: int = 1,
    min_scale: float = 0.35,
    hflip: bool = True,
    max_images: int | None = None,
    batch_size: int = 32,
    num_workers: int = 2,
    shard_size: int = 1000,
    calibration_images: int = 256,
    calibration_tokens: int = 100_000,
    min_cosine: float = 0.99,
    max_ratio: float = 0.2,
    components: dict[str, int] | None = None,
    seed: int = 0,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> dict:
    """Write the cache (see the module docstring); returns its meta.json content. `device`: where the teachers
    run (they are moved there; e.g. "cuda"); None = where their parameters already are."""
    out = Path(out)
    if device is not None:
        for t in teachers:
            t.to(device)
    device = _teacher_device(teachers)
    out.mkdir(parents=True, exist_ok=True)
    dataset = source.dataset(_ViewMaker(image_size, views, min_scale, hflip))
    if isinstance(dataset, IterableDataset):
        dataset = SeededStream(dataset, seed)
        length = max_images
    else:
        length = len(dataset) if max_images is None else min(max_images, len(dataset))
        keys = [(0, i) for i in range(length)]
        dataset = torch.utils.data.Subset(SeededSamples(dataset, seed), keys)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=length, desc="teacher cache", unit="img")

    pending: list[tuple[dict, dict]] = []  # calibration samples waiting for the codecs
    codecs: dict[str, PcaCodec] = {}
    shard: list[tuple[str, dict, bytes]] = []
    index: list[dict] = []
    stats = {"images": 0, "skipped": 0, "shards": 0}
    theia = {t.name: 0 for t in teachers}
    grids: dict[str, list[int]] = {}
    cos_stats: dict[str, dict] = {}
    stored = {"tgt": 0}  # compressed .tgt bytes written
    started = time.time()

    def flush_shard() -> None:
        if not shard:
            return
        name = f"shard-{stats['shards']:06d}.tar"
        records = []

        def write(tmp: str) -> None:
            with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
                for key, views_json, tgt in shard:
                    rec = {"key": key, "shard": name, "views": views_json["views"]}
                    for ext, data in (("png", views_json["png"]), ("json", json.dumps(views_json["views"]).encode()),
                                      ("tgt", tgt)):
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size, info.mtime, info.mode = len(data), 0, 0o644
                        data_offset = tar.offset + 512  # one ustar header block precedes the data
                        tar.addfile(info, io.BytesIO(data))
                        if ext != "json":
                            rec[ext] = [data_offset, len(data)]
                    records.append(rec)

        atomic_write(out / name, write)
        index.extend(records)
        stats["shards"] += 1
        shard.clear()

    def emit(sample: dict, outputs: dict) -> None:
        parts = []
        for v in range(len(sample["views"])):
            for t in teachers:
                summary, dense = outputs[t.name]
                q, scale = codecs[t.name].encode(_tokens(dense[v:v + 1]))
                parts.append((summary[v] if summary is not None else None, q, scale))
        key = f"{stats['images']:09d}"
        tgt = _store(pack(parts))
        stored["tgt"] += len(tgt)
        shard.append((key, sample, tgt))
        stats["images"] += 1
        if len(shard) >= shard_size:
            flush_shard()

    def fit_codecs() -> None:
        budgets, calibration = {}, {}
        for t in teachers:
            calib = torch.cat([_tokens(o[t.name][1]) for _, o in pending])
            if len(calib) > calibration_tokens:
                calib = calib[torch.randperm(len(calib), generator=torch.Generator().manual_seed(seed))[:calibration_tokens]]
            calibration[t.name] = calib
            tokens_per_view = grids[t.name][0] * grids[t.name][1]
            # this teacher's share of the budget; `allocate` then moves bytes between teachers
            per_token, tiny = per_token_budget(max_ratio, theia[t.name] / len(pending), len(teachers), views,
                                               t.encoder.summary_dim, tokens_per_view)
            if tiny:
                warnings.warn(f"teacher cache: '{t.name}' has {tokens_per_view} tokens per view, too few for the tar "
                              f"member overhead to fit in {max_ratio} of Theia's bytes; budgeting the payload only.")
            budgets[t.name] = (per_token, tokens_per_view)
        fixed = components or {}
        for t in teachers:
            if t.name in fixed:
                codecs[t.name] = PcaCodec.fit(calibration[t.name], components=fixed[t.name])
        codecs.update(allocate({t.name: (calibration[t.name], *budgets[t.name]) for t in teachers if t.name not in fixed}))
        for t in teachers:
            codec, calib = codecs[t.name], calibration[t.name]
            cos = token_cosines(codec.decode(*codec.encode(calib)), calib)
            cos_stats[t.name] = {"mean": float(cos.mean()), "p1": float(torch.quantile(cos, 0.01)),
                                 "components": codec.components, "bits": codec.bits, "head": codec.head,
                                 "alpha": codec.alpha, "bytes_budget_per_token": round(budgets[t.name][0], 2)}
            if cos_stats[t.name]["mean"] < min_cosine:
                warnings.warn(f"teacher cache: '{t.name}' reconstructs at mean token cosine {cos_stats[t.name]['mean']:.4f} "
                              f"< {min_cosine} within {max_ratio} of Theia's bytes; raise max_ratio (or set "
                              f"components) for this teacher if that is too lossy.")
            codec.save(out / f"codec-{t.name}.safetensors")
        for sample, outputs in pending:
            emit(sample, outputs)
        pending.clear()

    for batch in loader:
        samples = [s for s in batch if not isinstance(s, Skipped)]
        stats["skipped"] += len(batch) - len(samples)
        if samples:
            pixels = torch.cat([s["pixels"] for s in samples])
            outputs = _run_teachers(teachers, pixels, device)
            for t in teachers:
                grids[t.name] = list(outputs[t.name][1].shape[-2:])
            start = 0
            for s in samples:
                if length is not None and stats["images"] + len(pending) >= length:
                    break
                k = len(s["views"])
                per = {n: (None if sm is None else sm[start:start + k], d[start:start + k]) for n, (sm, d) in outputs.items()}
                for n, (sm, d) in per.items():
                    theia[n] += theia_bytes(None if sm is None else sm[0], d[0])  # one view per image, like Theia
                start += k
                record = {"png": s["png"], "views": [list(v) for v in s["views"]]}
                if codecs:
                    emit(record, per)
                else:
                    pending.append((record, per))
            if not codecs and len(pending) >= calibration_images:
                fit_codecs()
        if bar is not None:
            bar.update(len(batch))
        if length is not None and stats["images"] + len(pending) >= length:
            break
    if bar is not None:
        bar.close()
    if not codecs:
        if not pending:
            raise ValueError(f"build_cache: the source gave no usable image ({stats['skipped']} skipped); check data.train.")
        fit_codecs()
    flush_shard()

    n = stats["images"]
    per_teacher = {}
    for t in teachers:
        tokens = grids[t.name][0] * grids[t.name][1]
        payload = teacher_bytes(t.encoder.summary_dim, tokens, codecs[t.name].bytes_per_token())
        per_teacher[t.name] = {
            "summary_dim": t.encoder.summary_dim, "dense_dim": t.encoder.dense_dim, "grid": grids[t.name],
            "components": codecs[t.name].components, "bits": codecs[t.name].bits, "head": codecs[t.name].head,
            "alpha": codecs[t.name].alpha, "bytes_per_view": payload,
            "theia_bytes_per_image": theia[t.name] / n, "ratio_per_view": payload / (theia[t.name] / n),
            "calibration_cosine": cos_stats[t.name],
        }
    tgt_size = views * sum(p["bytes_per_view"] for p in per_teacher.values())
    theia_total = sum(p["theia_bytes_per_image"] for p in per_teacher.values())
    meta = {
        "version": CACHE_VERSION, "image_size": image_size, "views": views, "min_scale": min_scale, "hflip": hflip,
        "seed": seed, "images": n, "skipped": stats["skipped"], "shards": stats["shards"],
        "teachers": [{"name": t.name, **{k: per_teacher[t.name][k] for k in ("summary_dim", "grid", "components", "bits", "head")}}
                     for t in teachers],
        "per_teacher": per_teacher,
        "compression": "zlib",
        "bytes_per_image": {"targets_payload": tgt_size, "targets_compressed": stored["tgt"] / max(n, 1),
                            "targets_on_disk": tar_member_bytes(round(stored["tgt"] / max(n, 1))),
                            "theia_bf16": theia_total, "ratio_payload": tgt_size / theia_total,
                            "ratio_compressed": stored["tgt"] / max(n, 1) / theia_total,
                            "ratio_on_disk": tar_member_bytes(round(stored["tgt"] / max(n, 1))) / theia_total},
        "seconds": round(time.time() - started, 1),
    }
    save_json({"samples": index}, out / "index.json")
    save_json(meta, out / "meta.json")
    return meta
