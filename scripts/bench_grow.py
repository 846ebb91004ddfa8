"""Grow a student on the toy world: CLIP+DINO for N steps, then +SAM for M steps from that export (model.init_from),
against CLIP+DINO+SAM from scratch for N+M steps.

    UNITOWER_CACHE=... PYTHONPATH=$PWD python scripts/bench_grow.py --first 150 --then 100 --seed 0

Prints the CPU model, then for the old teachers (clip, dino) their validation cosines and benchmarks after stage 1
and after the grow (forgetting = after - before) next to the scratch run, the new teacher's fidelity (SAM dense
cosine, sam_miou), and wall times. All teachers run online: the teacher cache is not used here (a cache may hold a
subset of the teachers, the others then run online, but writing the toy cache costs more than these short runs).
"""

from __future__ import annotations

import argparse
import json
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
    args = parser.parse_args(argv)
    out = Path(args.out)
    print(f"CPU: {cpu_info()[0]}; N={args.first} (clip+dino), M={args.then} (+sam), scratch N+M={args.first + args.then}",
          flush=True)
    stage1 = fit(toy_config(args.first, args.seed, teachers=["clip", "dino"]), out / "stage1")
    before = final_metrics(out / "stage1")
    from distill.export import export_student

    export = export_student(last_checkpoint(out / "stage1"), out / "stage1_export", with_adaptors=True)
    StudentModel.from_export(export)  # the export reloads
    grow = fit(toy_config(args.then, args.seed, model={"init_from": str(export)}), out / "grown")
    after = final_metrics(out / "grown")
    scratch = fit(toy_config(args.first + args.then, args.seed), out / "scratch")
    ref = final_metrics(out / "scratch")
    (out / "results.json").write_text(json.dumps({"before": before, "after": after, "scratch": ref,
                                                  "wall_s": {"stage1": stage1, "grow": grow, "scratch": scratch}}, indent=1))
    keys = sorted(k for k in set(after) | set(before) if k.endswith(("summary_cos", "dense_cos")) and "@" not in k
                  or (k.startswith("bench/") and "/student" in k))
    print(f"\n{'metric':44s} {'stage1 (N)':>11s} {'grown (N+M)':>12s} {'forgetting':>11s} {'scratch (N+M)':>14s}")
    for key in keys:
        b, a, r = before.get(key), after.get(key), ref.get(key)
        fmt = lambda v: f"{v:.4f}" if v is not None else "-"  # noqa: E731
        forget = f"{a - b:+.4f}" if a is not None and b is not None else "-"
        print(f"{key:44s} {fmt(b):>11s} {fmt(a):>12s} {forget:>11s} {fmt(r):>14s}")
    print(f"\nwall time: stage1 {stage1:.0f} s + grow {grow:.0f} s = {stage1 + grow:.0f} s; scratch {scratch:.0f} s "
          "(each includes process start, teacher loading and one validation with the benchmarks)")


if __name__ == "__main__":
    main()
