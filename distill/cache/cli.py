"""`python -m distill cache`: run a distillation config's teachers once over its training images and write
the compressed teacher-feature cache (distill/cache/writer.py).

    python -m distill cache -c configs/distill/toy.yaml --out cache/toy --images 20000 [--views 2]
    python -m distill fit -c configs/distill/toy.yaml --data.teacher_cache cache/toy

The teachers are `model.teachers` of the config, the images `data.train`, the crops follow
`data.image_size`, `data.min_scale` and `data.hflip`; DataLoader workers (`--workers`, default
`data.num_workers`) decode and crop, the teachers run in this process, on `--device` (default: the GPU when
there is one).
"""

from __future__ import annotations

import argparse
import json

import torch
import yaml


def _instantiate(config: dict):
    """(teachers, data module) of a distill fit config dict."""
    from jsonargparse import ArgumentParser

    from distill.data import DistillDataModule
    from distill.teacher import Teacher

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--teachers", type=list[Teacher])
    parser.add_class_arguments(DistillDataModule, "data")
    model = config.get("model") or {}
    if "teachers" not in model or "data" not in config:
        raise ValueError("the config needs model.teachers and data (a `python -m distill fit` config).")
    data = {k: v for k, v in config["data"].items() if k != "teacher_cache"}
    cfg = parser.parse_object({"teachers": model["teachers"], "data": data})
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in jsonargparse 4.49
    init = instantiate(cfg)
    return init.teachers, init.data


def main(argv: list[str]) -> dict:
    from distill.cache.writer import build_cache

    parser = argparse.ArgumentParser(prog="python -m distill cache", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True, help="a `python -m distill fit` YAML config")
    parser.add_argument("--out", required=True, help="cache folder to write")
    parser.add_argument("--images", type=int, default=None, help="images to cache (default: the whole source; "
                        "required for endless (resampled) shard sources)")
    parser.add_argument("--views", type=int, default=1, help="random crops stored per image (training draws one)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default data.num_workers)")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per tar shard")
    parser.add_argument("--calibration-images", type=int, default=256, help="images the PCA bases are fitted on")
    parser.add_argument("--max-ratio", type=float, default=0.2, help="byte budget per teacher vs Theia's bf16 layout")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stored crops")
    parser.add_argument("--device", default=None, help="where the teachers run (default: cuda when available, else cpu)")
    opts = parser.parse_args(argv)
    with open(opts.config) as f:
        config = yaml.safe_load(f)
    teachers, data = _instantiate(config)
    if getattr(data.train_source, "resampled", False) and opts.images is None:
        raise SystemExit(f"{opts.config}: data.train reads shards resampled (endless); pass --images N.")
    meta = build_cache(
        teachers, data.train_source, opts.out, image_size=data.image_size, views=opts.views,
        min_scale=data.min_scale, hflip=data.hflip, max_images=opts.images, batch_size=opts.batch_size,
        num_workers=data.num_workers if opts.workers is None else opts.workers, shard_size=opts.shard_size,
        calibration_images=opts.calibration_images, max_ratio=opts.max_ratio, seed=opts.seed,
        device=opts.device or ("cuda" if torch.cuda.is_available() else "cpu"),
    )
    summary = {"images": meta["images"], "skipped": meta["skipped"], "shards": meta["shards"],
               "bytes_per_image": meta["bytes_per_image"],
               "teachers": {n: {"components": p["components"], "bits": p["bits"], "ratio_per_view": round(p["ratio_per_view"], 4),
                                "calibration_cosine": p["calibration_cosine"]} for n, p in meta["per_teacher"].items()}}
    print(json.dumps(summary, indent=1))
    print(f"wrote {opts.out}; train with --data.teacher_cache {opts.out}")
    return meta
