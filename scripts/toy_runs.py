"""Short toy-recipe fits for the loss and grow benchmarks (scripts/bench_losses.py, scripts/bench_grow.py).

    config = toy_config(max_steps=150, seed=0, model={"summary_loss": "angle_balanced"}, teachers=["clip", "dino"])
    seconds = fit(config, "runs/bench/x")        # python -m distill fit -c <written yaml>, in a subprocess
    metrics = final_metrics("runs/bench/x")      # {"val/clip/summary_cos": ..., "bench/knn_.../student_dino": ...}

A run is configs/distill/toy.yaml with fewer steps, one validation (with the in-training benchmarks) at the end,
one checkpoint at the end, and the given overrides; the toy world must be built ($UNITOWER_CACHE).
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


SMALL_BENCH = {"num_bank": 300, "num_query": 150, "num_mask_images": 50}  # fewer probe images than toy.yaml


def toy_config(max_steps: int, seed: int, model: dict | None = None, teachers: list[str] | None = None,
               batch_size: int | None = None, bench: dict | None = SMALL_BENCH, val_batches: int = 4) -> dict:
    """The toy recipe as a dict with `max_steps`, `seed`, `model` overrides and only `teachers` (None: all);
    `bench` overrides the EncoderBenchmarks sizes, `val_batches` the validation batches (toy.yaml: 8)."""
    config = yaml.safe_load((ROOT / "configs/distill/toy.yaml").read_text())
    config["seed_everything"] = seed
    config["data"]["train"]["init_args"]["seed"] = seed
    trainer = config["trainer"]
    trainer.update(max_steps=max_steps, val_check_interval=max_steps, log_every_n_steps=max(1, max_steps // 10),
                   limit_val_batches=val_batches, num_sanity_val_steps=0)
    for callback in trainer["callbacks"]:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["every_n_train_steps"] = max_steps
        if callback["class_path"].endswith("EncoderBenchmarks"):
            callback["init_args"].update(at_start=False, **(bench or {}))
            if teachers is not None and "sam" not in teachers:
                callback["init_args"]["probes"] = [p for p in callback["init_args"]["probes"] if p != "sam_miou"]
    if teachers is not None:
        config["model"]["teachers"] = [t for t in config["model"]["teachers"] if t["init_args"]["name"] in teachers]
    if batch_size is not None:
        config["data"]["batch_size"] = batch_size
    config["model"]["warmup_steps"] = min(config["model"]["warmup_steps"], max_steps // 5)
    config["model"].update(model or {})
    return config


def fit(config: dict, root: str | Path) -> float:
    """Write `config` (default_root_dir = `root`) and run `python -m distill fit` on it; wall seconds."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    config["trainer"]["default_root_dir"] = str(root)
    path = root / "config.input.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "distill", "fit", "-c", str(path)], cwd=ROOT, env=os.environ.copy(),
                            capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        raise RuntimeError(f"fit in {root} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return seconds


def final_metrics(root: str | Path) -> dict[str, float]:
    """The last logged value of every val/ and bench/ key in the newest metrics.csv below `root`."""
    files = sorted(Path(root).glob("lightning_logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    if not files:
        raise FileNotFoundError(f"no lightning_logs/version_*/metrics.csv below {root}")
    values: dict[str, float] = {}
    with open(files[-1], newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if value not in ("", None) and key.startswith(("val/", "bench/")):
                    values[key] = float(value)
    return values


def last_checkpoint(root: str | Path) -> Path:
    """root/.../checkpoints/last.ckpt (ModelCheckpoint's save_last) of a finished run."""
    found = sorted(Path(root).glob("lightning_logs/version_*/checkpoints/last.ckpt")) + sorted(Path(root).glob("**/last.ckpt"))
    if not found:
        raise FileNotFoundError(f"no last.ckpt below {root}")
    return found[0]


def paired_ci(diffs: list[float]) -> tuple[float, float]:
    """Mean of paired differences and the half-width of its 95% t interval (nan for one pair)."""
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    return mean, T_975[n - 1] * sd / math.sqrt(n)
