"""C-RADIOv4's loss options on the toy recipe: baseline vs +shift-equivariant vs +angle-balanced, paired by seed.

    UNITOWER_CACHE=... PYTHONPATH=$PWD python scripts/bench_losses.py --steps 150 --seeds 0 1 2

Each run is configs/distill/toy.yaml cut to --steps steps (scripts/toy_runs.py: one validation with the
in-training benchmarks at the end). Prints the CPU model, then per metric the baseline mean and, per option,
the mean paired difference (option - baseline over the same seed) with its 95% t interval.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from distill.common.precision import cpu_info
from toy_runs import final_metrics, fit, paired_ci, toy_config

VARIANTS = {
    "baseline": {},
    "shift_equivariant": {"shift_equivariant": True},
    "angle_balanced": {"summary_loss": "angle_balanced"},
}
METRICS = ("val/clip/summary_cos", "val/clip/dense_cos", "val/dino/summary_cos", "val/dino/dense_cos", "val/sam/dense_cos")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/bench_losses")
    args = parser.parse_args(argv)
    print(f"CPU: {cpu_info()[0]}; toy recipe cut to {args.steps} steps, seeds {args.seeds}", flush=True)
    results: dict[str, dict[int, dict]] = {name: {} for name in VARIANTS}
    for seed in args.seeds:
        for name, overrides in VARIANTS.items():
            root = Path(args.out) / f"{name}_s{seed}"
            seconds = fit(toy_config(args.steps, seed, model=overrides), root)
            results[name][seed] = {**final_metrics(root), "wall_s": seconds}
            print(f"  {name} seed {seed}: {seconds:.0f} s", flush=True)
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1))
    keys = list(METRICS) + sorted(k for k in results["baseline"][args.seeds[0]] if k.startswith("bench/")
                                  and "/student" in k) + ["wall_s"]
    options = [n for n in VARIANTS if n != "baseline"]
    print(f"\n{'metric':44s} {'baseline':>9s} " + " ".join(f"{'d ' + n + ' (95% CI)':>32s}" for n in options))
    for key in keys:
        base = [results["baseline"][s].get(key) for s in args.seeds]
        if any(v is None for v in base):
            continue
        cells = []
        for name in options:
            diffs = [results[name][s][key] - results["baseline"][s][key] for s in args.seeds]
            mean, half = paired_ci(diffs)
            cells.append(f"{mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}]")
        print(f"{key:44s} {sum(base) / len(base):9.4f} " + " ".join(f"{c:>32s}" for c in cells))


if __name__ == "__main__":
    main()
