"""Student EMA on the toy recipe (issue 19 item 1): validation cosines and in-training benchmarks of the EMA vs the
trained weights, per seed, with the paired difference and its 95% CI (t-interval over seeds).

    PYTHONPATH=$PWD python scripts/bench_ema.py                          # 3 seeds, 120 steps, decay 0.97
    PYTHONPATH=$PWD python scripts/bench_ema.py --seeds 0 1 --max-steps 60 --decay 0.95

Each seed is one `unitower distill fit` of configs/distill/toy.yaml with `model.ema_decay` (max_steps cut to
--max-steps, the LR schedule follows it; validation cut to --val-batches, the benchmark sets to --num-bank), then two `trainer.validate` passes over the whole toy validation set with
the EncoderBenchmarks callback: one scoring the EMA, one scoring the trained weights. The EMA never touches training
(tests/test_ema.py checks the trained weights are bit-identical with and without it), so the second pass is exactly
the run without EMA. Needs the toy world's build in $UNITOWER_CACHE. Prints the CPU model and a table.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from distill.cli import lightning_cli
from distill.common.precision import cpu_info

ROOT = Path(__file__).resolve().parents[1]


def config(seed: int, args, folder: Path) -> Path:
    cfg = yaml.safe_load((ROOT / "configs/distill/toy.yaml").read_text())
    cfg["seed_everything"] = seed
    bench = [c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("EncoderBenchmarks")]
    bench[0]["init_args"].update(at_start=False, every_n_validations=1, num_bank=args.num_bank, num_query=args.num_bank // 2,
                                 num_mask_images=args.num_bank // 5)
    # no validation inside the fit (val_check_interval past max_steps): the two validate passes below score it
    cfg["trainer"].update(max_steps=args.max_steps, val_check_interval=args.max_steps + 1, limit_val_batches=args.val_batches,
                          default_root_dir=str(folder), enable_progress_bar=False, enable_checkpointing=False,
                          num_sanity_val_steps=0, logger=False, callbacks=bench)
    cfg["model"].update(ema_decay=args.decay, warmup_steps=min(cfg["model"]["warmup_steps"], args.max_steps // 4))
    cfg["data"]["num_workers"] = 0
    path = folder / f"seed{seed}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def scores(cli) -> dict[str, float]:
    """val/*cos and bench/*student* of one validate pass over the toy validation set."""
    metrics = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    return {k: float(v) for k, v in sorted(metrics.items())
            if (k.startswith("val/") and k.endswith("_cos")) or (k.startswith("bench/") and "student" in k)}


def t_quantile(df: int) -> float:
    """The two-sided 95% t quantile with `df` degrees of freedom."""
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, df))
    except ImportError:
        return {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}.get(df, 1.96)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-steps", type=int, default=120)
    parser.add_argument("--decay", type=float, default=0.97)
    parser.add_argument("--val-batches", type=int, default=4, help="validation batches of 32 toy images")
    parser.add_argument("--num-bank", type=int, default=300,
                        help="k-NN bank images (queries: half, SAM mask images: a fifth); the recipe uses 1000")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"CPU: {cpu_info()[0]}; torch threads {torch.get_num_threads()}; toy recipe, max_steps {args.max_steps}, "
          f"ema_decay {args.decay} (window ~{1 / (1 - args.decay):.0f} steps), seeds {args.seeds}", flush=True)
    rows: dict[str, dict[int, tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            start = time.perf_counter()
            cli = lightning_cli(["fit", "-c", str(config(seed, args, Path(tmp)))])
            fit_s = time.perf_counter() - start
            ema = scores(cli)
            cli.model.ema = torch.nn.ModuleDict()  # the same run without EMA: score the trained weights
            raw = scores(cli)
            print(f"seed {seed}: fit {fit_s:.0f} s, {len(ema)} scores", flush=True)
            for key in ema:
                rows.setdefault(key, {})[seed] = (raw[key], ema[key])
    print(f"\n{'score':<40} {'raw (mean)':>10} {'ema (mean)':>10} {'ema - raw':>10} {'95% CI':>20}  per seed (ema - raw)")
    for key, per_seed in rows.items():
        diffs = [e - r for r, e in per_seed.values()]
        mean = statistics.fmean(diffs)
        half = t_quantile(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
        raw_mean = statistics.fmean(r for r, _ in per_seed.values())
        ema_mean = statistics.fmean(e for _, e in per_seed.values())
        print(f"{key:<40} {raw_mean:>10.4f} {ema_mean:>10.4f} {mean:>+10.4f} [{mean - half:+.4f}, {mean + half:+.4f}]  "
              + " ".join(f"{d:+.4f}" for d in diffs))


if __name__ == "__main__":
    main()
