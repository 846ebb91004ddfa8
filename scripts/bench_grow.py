"""Grow a student on the toy world: CLIP+DINO for N steps, then +SAM for M steps from that export (model.init_from),
against CLIP+DINO+SAM from scratch for N+M steps.

    UNITOWER_CACHE=... PYTHONPATH=$PWD python scripts/bench_grow.py --first 150 --then 100 --seed 0

Prints the CPU model, then for the old teachers (clip, dino) their validation cosines and benchmarks after stage 1
and after the grow (forgetting = after - before) next to the scratch run, the new teacher's fidelity (SAM dense
cosine, sam_miou), and wall times. With --cache-images K a second grow run reads CLIP and DINO from a teacher cache
of K toy images (`python -m distill cache` with the stage-1 config, timed separately) and runs only SAM online.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from distill.common.precision import cpu_info
from distill.model import StudentModel
from toy_runs import final_metrics, fit, last_checkpoint, toy_config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--first", type=int, default=150, help="N: CLIP+DINO steps")
    parser.add_argument("--then", type=int, default=100, help="M: +SAM steps from the stage-1 export")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench_grow")
    parser.add_argument("--cache-images", type=int, default=0, help="also grow with clip+dino from a cache of K images")
    parser.add_argument("--reuse", action="store_true", help="keep the finished runs of an earlier call in --out")
    args = parser.parse_args(argv)
    out = Path(args.out)
    print(f"CPU: {cpu_info()[0]}; N={args.first} (clip+dino), M={args.then} (+sam), scratch N+M={args.first + args.then}",
          flush=True)
    previous = json.loads((out / "results.json").read_text())["wall_s"] if args.reuse and (out / "results.json").exists() else {}

    def run(name: str, config: dict, key: str) -> float:
        done = previous.get(key) is not None and list((out / name).glob("lightning_logs/version_*/metrics.csv"))
        return previous[key] if done else fit(config, out / name)

    stage1 = run("stage1", toy_config(args.first, args.seed, teachers=["clip", "dino"]), "stage1")
    before = final_metrics(out / "stage1")
    from distill.export import export_student

    export = export_student(last_checkpoint(out / "stage1"), out / "stage1_export", with_adaptors=True)
    StudentModel.from_export(export)  # the export reloads
    grow = run("grown", toy_config(args.then, args.seed, model={"init_from": str(export)}), "grow")
    after = final_metrics(out / "grown")
    scratch = run("scratch", toy_config(args.first + args.then, args.seed), "scratch")
    ref = final_metrics(out / "scratch")
    cached = cache_s = None
    if args.cache_images:
        stage1_config = out / "stage1" / "config.input.yaml"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "distill", "cache", "-c", str(stage1_config), "--out", str(out / "cache"),
                        "--images", str(args.cache_images), "--workers", "0"], check=True, capture_output=True)
        cache_s = time.perf_counter() - start
        config = toy_config(args.then, args.seed, model={"init_from": str(export)})
        config["data"]["teacher_cache"] = str(out / "cache")
        cached_s = fit(config, out / "grown_cached")
        cached = final_metrics(out / "grown_cached")
    (out / "results.json").write_text(json.dumps({"before": before, "after": after, "scratch": ref, "grown_cached": cached,
                                                  "wall_s": {"stage1": stage1, "grow": grow, "scratch": scratch,
                                                             "cache": cache_s, "grow_cached": cached and cached_s}}, indent=1))
    keys = sorted(k for k in set(after) | set(before) if k.endswith(("summary_cos", "dense_cos")) and "@" not in k
                  or (k.startswith("bench/") and "/student" in k))
    extra = f" {'grown, cached':>14s}" if cached else ""
    print(f"\n{'metric':44s} {'stage1 (N)':>11s} {'grown (N+M)':>12s} {'forgetting':>11s} {'scratch (N+M)':>14s}{extra}")
    for key in keys:
        b, a, r = before.get(key), after.get(key), ref.get(key)
        fmt = lambda v: f"{v:.4f}" if v is not None else "-"  # noqa: E731
        forget = f"{a - b:+.4f}" if a is not None and b is not None else "-"
        tail = f" {fmt(cached.get(key)):>14s}" if cached else ""
        print(f"{key:44s} {fmt(b):>11s} {fmt(a):>12s} {forget:>11s} {fmt(r):>14s}{tail}")
    print(f"\nwall time: stage1 {stage1:.0f} s + grow {grow:.0f} s = {stage1 + grow:.0f} s; scratch {scratch:.0f} s "
          "(each includes process start, teacher loading and one validation with the benchmarks)")
    if cached:
        print(f"cached grow: writing the clip+dino cache of {args.cache_images} images {cache_s:.0f} s, "
              f"grow from it {cached_s:.0f} s")


if __name__ == "__main__":
    main()
