"""Where a toy LLaVA finetune step's time goes, and candidate settings side by side (issue 18, "the reader").

    PYTHONPATH=$PWD UNITOWER_CACHE=... python scripts/bench_reader.py --features OUT/features/clip-seed0-8000-KEY.safetensors
    PYTHONPATH=$PWD UNITOWER_CACHE=... python scripts/bench_reader.py --features oracle --quick    # no study needed

`--features` is a training-image cache file the study wrote (OUT/features/<variant>-seed0-<count>-<key>.safetensors)
or `oracle` (ground-truth tokens of `--train-images` images, written to a temporary folder).

The modules are the real ones: the study's finetune stage config (mllm.study.toy.stage_config on
configs/mllm/toy_finetune.yaml) built by the `unitower llava` CLI (LlavaModule, LlavaDataModule with a
CachedTower and the cached-features ToySource). Prints the CPU model and torch thread count, then

1. breakdown: one finetune step in timed sections (data loading + collation, projector + embedding, LM
   forward, backward, AdamW step) per batch size and precision, as median ms and share of the step;
2. Lightning: the same settings through `Trainer.fit` (StepTimer steps/s) vs the hand loop: the difference
   is Lightning's overhead (logging, hooks, LR scheduler, loops);
3. candidates interleaved round-robin in one process (batch size x fp32 / bf16 autocast x torch.compile):
   steps/s and examples/s, each relative to batch 32 fp32; torch.compile's one-off compile time is printed.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("data", "projector+embed", "lm forward", "backward", "optimizer")


def log(msg: str) -> None:
    print(msg, flush=True)


def oracle_features(folder: Path, num_images: int) -> str:
    """Oracle tokens (grid 2, one object per image) of the training world as a cache file in `folder`."""
    from mllm.features import cache_features, oracle_tokens

    config = {"control": "oracle", "grid": 2}
    return str(cache_features(lambda: oracle_tokens(0, num_images, 64, 2, 1), "oracle", config, 0, num_images, 64,
                              folder, max_objects=1))


def stage_cfg(features: str, batch_size: int, steps: int, run_dir: Path, precision: str = "32-true",
              train_images: int = 8000, overrides: dict | None = None) -> dict:
    """The study's finetune stage config (no init_from) with this batch size, precision and step count."""
    from dataclasses import replace

    from mllm.study.config import load_study, with_budget
    from mllm.study.toy import stage_config

    study = load_study(ROOT / "configs/study/toy.yaml")
    budget = replace(with_budget(study, smoke=False), train_images=train_images)
    recipe = yaml.safe_load((ROOT / study.finetune_recipe).read_text())
    cfg = stage_config(recipe, "finetune", 0, steps, run_dir, features, study, budget)
    cfg["model"]["init_from"] = None
    cfg["data"]["batch_size"] = batch_size
    cfg["trainer"]["precision"] = precision
    for dotted, value in (overrides or {}).items():
        node = cfg
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return cfg


def build(cfg: dict, run_dir: Path):
    """(cli) with model, datamodule and trainer instantiated by the `unitower llava` CLI, not fitted."""
    from mllm.cli import make_cli

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return make_cli(["-c", str(path)], run=False)


class HandLoop:
    """The finetune step of LlavaModule.training_step + AdamW, written out in timed sections."""

    def __init__(self, cli, bf16: bool, compiled: bool) -> None:
        self.module, data = cli.model, cli.datamodule
        data.setup("fit")
        if self.module.model.tower.needs_calibration:  # what LlavaModule.on_fit_start does in a fit
            self.module.calibrate_tower(data)
        self.module.train()
        self.model = self.module.model
        self.optimizer = torch.optim.AdamW(self.module.parameter_groups(), weight_decay=self.module.hparams.weight_decay)
        self.batches = iter(data.train_dataloader())
        self.batch_size = data.batch_size
        self.bf16 = bf16
        self.lm = torch.compile(self.model.lm) if compiled else self.model.lm
        self.compile_seconds = None
        if compiled:  # the first step compiles: time it once
            start = time.perf_counter()
            self.step()
            self.compile_seconds = time.perf_counter() - start

    def step(self) -> dict[str, float]:
        times = {}
        t = time.perf_counter()
        batch = next(self.batches)
        now = time.perf_counter()
        times["data"], t = now - t, now
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            embeds = self.model.embed(batch["input_ids"], batch["images"])
            now = time.perf_counter()
            times["projector+embed"], t = now - t, now
            loss = self.lm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        now = time.perf_counter()
        times["lm forward"], t = now - t, now
        loss.backward()
        now = time.perf_counter()
        times["backward"], t = now - t, now
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        times["optimizer"] = time.perf_counter() - t
        return times


def lightning_steps_per_second(cli) -> float:
    from mllm.study.common import steps_per_second

    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return steps_per_second(cli)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", required=True, help="a study training-features file, or 'oracle'")
    parser.add_argument("--train-images", type=int, default=8000, help="training images of the features file")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per setting and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the candidates")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out of the candidates")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the study's workers use 1)")
    parser.add_argument("--lm", default="toy:lm", help="the LM (model.lm), e.g. a toy LM folder")
    parser.add_argument("--quick", action="store_true", help="batch 32 and 128, 5 steps, 1 round, no compile")
    args = parser.parse_args()
    if args.quick:
        args.batch_sizes, args.steps, args.rounds, args.no_compile = [32, 128], 5, 1, True
    torch.set_num_threads(args.threads)
    from distill.common.precision import cpu_info
    from mllm.study.common import quiet_libraries

    quiet_libraries()
    name, flags = cpu_info()
    log(f"CPU: {name}; bf16 units: {','.join(f for f in ('avx512_bf16', 'amx_bf16') if f in flags) or 'none'}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    tmp = Path(tempfile.mkdtemp(prefix="bench_reader-"))
    features = oracle_features(tmp / "features", args.train_images) if args.features == "oracle" else args.features
    log(f"features: {features}")

    # candidates: (batch size, bf16, compiled)
    candidates = [(b, bf16, False) for b in args.batch_sizes for bf16 in (False, True)]
    if not args.no_compile:
        candidates += [(b, False, True) for b in (args.batch_sizes[0], args.batch_sizes[-1])]
    loops: dict[tuple, HandLoop] = {}
    for cand in tqdm(candidates, desc="building"):
        b, bf16, compiled = cand
        cfg = stage_cfg(features, b, 10**6, tmp / f"hand-{b}-{bf16}-{compiled}", train_images=args.train_images,
                        overrides={"model.lm": args.lm})
        loops[cand] = HandLoop(build(cfg, tmp / f"hand-{b}-{bf16}-{compiled}"), bf16, compiled)
        if compiled:
            log(f"torch.compile of the LM (batch {b}): first step {loops[cand].compile_seconds:.1f} s")
    for loop in loops.values():  # warm-up: kernel selection, loader start
        for _ in range(3):
            loop.step()
    samples: dict[tuple, list[dict]] = {c: [] for c in candidates}
    for _ in tqdm(range(args.rounds), desc="interleaved rounds"):
        for cand in candidates:
            samples[cand] += [loops[cand].step() for _ in range(args.steps)]

    log("\n## 1. Finetune step breakdown (hand loop of the real modules; median ms per step, share of the step)\n")
    log("| batch | precision | " + " | ".join(SECTIONS) + " | step ms |")
    log("|---|---|" + "---|" * (len(SECTIONS) + 1))
    medians = {}
    for cand in candidates:
        b, bf16, compiled = cand
        med = {s: statistics.median(t[s] for t in samples[cand]) * 1e3 for s in SECTIONS}
        total = statistics.median(sum(t.values()) for t in samples[cand]) * 1e3
        medians[cand] = total
        label = ("bf16 autocast" if bf16 else "fp32") + (" + compile" if compiled else "")
        log(f"| {b} | {label} | " + " | ".join(f"{med[s]:.1f} ({med[s] / total:.0%})" for s in SECTIONS) + f" | {total:.1f} |")

    log("\n## 2. Candidates side by side (interleaved; relative to batch "
        f"{args.batch_sizes[0]} fp32)\n")
    base = medians[(args.batch_sizes[0], False, False)]
    log("| batch | precision | steps/s | examples/s | examples/s ratio |")
    log("|---|---|---|---|---|")
    for cand in candidates:
        b, bf16, compiled = cand
        label = ("bf16 autocast" if bf16 else "fp32") + (" + compile" if compiled else "")
        log(f"| {b} | {label} | {1e3 / medians[cand]:.2f} | {b * 1e3 / medians[cand]:.0f} | "
            f"{(b / medians[cand]) / (args.batch_sizes[0] / base):.2f}x |")

    log("\n## 3. Lightning fit vs hand loop (same settings, fp32)\n")
    log("| batch | Lightning steps/s | hand loop steps/s | Lightning overhead per step |")
    log("|---|---|---|---|")
    steps = max(20, args.steps * 2)
    for b in (args.batch_sizes[0], args.batch_sizes[-1]):
        run_dir = tmp / f"lightning-{b}"
        rate = lightning_steps_per_second(build(stage_cfg(features, b, steps, run_dir, train_images=args.train_images,
                                                           overrides={"model.lm": args.lm}), run_dir))
        hand = medians[(b, False, False)]
        log(f"| {b} | {rate:.2f} | {1e3 / hand:.2f} | {1e3 / rate - hand:.1f} ms |")


if __name__ == "__main__":
    main()
