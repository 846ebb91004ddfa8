"""Run the study: distill the student (unless given), train and evaluate LLaVA with every variant and
seed, reuse finished runs (keyed by a hash of their full config), and write the report.

Each run lives in OUT/runs/<variant>/seed<k>-<key>/ with align.yaml, finetune.yaml (the exact
configs), align.ckpt, finetune.ckpt, eval.json and record.json (written last: a run with a
record.json is finished). A failing variant is recorded as failed with its error; the rest go on.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import os
import platform
import time
import traceback
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from distill.io import atomic_write, save_json
from mllm.study.config import STUDENT_PLACEHOLDER, Budget, Study, Variant
from mllm.study.cost import count_params, tower_cost
from mllm.study.report import aggregate, write_report


def config_key(*parts: object) -> str:
    """Short stable hash of JSON-serialisable parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def write_yaml(cfg: dict, path: Path) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(yaml.safe_dump(cfg, sort_keys=False)))


def stage_config(recipe: dict, tower: dict, stage: str, seed: int, steps: int, run_dir: Path, study: Study) -> dict:
    """The recipe with this variant's tower, seed, steps and output paths; validation off (evaluated after)."""
    cfg = copy.deepcopy(recipe)
    cfg["seed_everything"] = seed
    cfg["model"]["tower"] = tower
    trainer = cfg.setdefault("trainer", {})
    trainer.update(
        max_steps=steps, default_root_dir=str(run_dir / stage), limit_val_batches=0, enable_progress_bar=False,
        enable_model_summary=False, log_every_n_steps=max(1, min(10, steps)),
        logger={"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run_dir), "name": stage}},
        callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(run_dir), "filename": stage, "enable_version_counter": False}},
                   {"class_path": "distill.timing.StepTimer"}],
    )
    trainer.pop("val_check_interval", None)
    cfg.setdefault("data", {})["image_size"] = study.image_size
    return cfg


def variant_tower(variant: Variant, study: Study, student: str | None) -> dict:
    """The variant's tower config with the common grid and the student path filled in."""
    tower = copy.deepcopy(variant.tower)
    args = tower.setdefault("init_args", {})
    if study.grid is not None:
        args["grid"] = study.grid
    if args.get("path") == STUDENT_PLACEHOLDER:
        if student is None:
            raise ValueError(f"variant {variant.name!r} needs the distilled student, but none was given or distilled.")
        args["path"] = student
    return tower


def eval_metrics(result: dict) -> dict[str, float]:
    """Flatten an evaluate_checkpoint result: overall, every question kind, and POPE F1 where present."""
    metrics = {"overall": result["overall"]["accuracy"]}
    for kind, entry in result["by_kind"].items():
        metrics[kind] = entry["accuracy"]
        if "pope" in entry and kind == "existence":
            metrics["existence_f1"] = entry["pope"]["f1"]
    return metrics


def eval_source(study: Study, budget: Budget):
    """The evaluation questions: a LLaVA JSON benchmark if configured, else the toy world's held-out images."""
    from mllm.data import LlavaJsonSource, ToySource

    if study.eval_json:
        return LlavaJsonSource(study.eval_json, study.eval_image_folder)
    return ToySource(seed=1000, num_images=budget.eval_images, stage="finetune", image_size=study.image_size)


def quiet_libraries() -> None:
    """Keep the study's console to one line per run: Lightning's per-run banners and known warnings off."""
    import logging
    import warnings

    for name in ("lightning.pytorch", "lightning.fabric", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for message in ("Found keys that are in the model state dict", "Found .* module\\(s\\) in eval mode",
                    "LightningCLI's args parameter", "Checkpoint directory .* exists", "The number of training batches"):
        warnings.filterwarnings("ignore", message=message)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def steps_per_second(cli) -> float | None:
    """The StepTimer measurement of a finished fit (None if the run had too few steps)."""
    from distill.timing import StepTimer

    timers = [c for c in cli.trainer.callbacks if isinstance(c, StepTimer)]
    return timers[0].steps_per_second if timers else None


def fit(cfg_path: Path) -> object:
    from mllm.cli import make_cli

    return make_cli(["fit", "-c", str(cfg_path)])


def run_variant(variant: Variant, seed: int, study: Study, budget: Budget, student: str | None,
                out_dir: Path, force: bool) -> dict:
    """Train align + finetune, evaluate, measure the tower; return (and store) the run record."""
    from mllm.evaluate import evaluate_checkpoint

    tower = variant_tower(variant, study, student)
    align_recipe = yaml.safe_load(Path(study.align_recipe).read_text())
    finetune_recipe = yaml.safe_load(Path(study.finetune_recipe).read_text())
    student_key = json.loads((Path(student) / "config.json").read_text()) if student and variant.kind == "student" else None
    key = config_key(tower, align_recipe, finetune_recipe, seed, budget.align_steps, budget.finetune_steps,
                     budget.eval_images, budget.toy_profile, study.image_size, study.eval_json, student_key,
                     os.path.getmtime(Path(student) / "model.safetensors") if student_key else None)
    run_dir = out_dir / "runs" / variant.name / f"seed{seed}-{key}"
    record_file = run_dir / "record.json"
    if record_file.is_file() and not force:
        return json.loads(record_file.read_text())
    record = {"variant": variant.name, "kind": variant.kind, "seed": seed, "run_dir": str(run_dir)}
    started = time.time()
    try:
        align = stage_config(align_recipe, tower, "align", seed, budget.align_steps, run_dir, study)
        align["model"]["init_from"] = None
        align_cli = fit(write_yaml(align, run_dir / "align.yaml"))
        finetune = stage_config(finetune_recipe, tower, "finetune", seed, budget.finetune_steps, run_dir, study)
        finetune["model"]["init_from"] = str(run_dir / "align.ckpt")
        cli = fit(write_yaml(finetune, run_dir / "finetune.yaml"))
        train_seconds = time.time() - started
        model = cli.model.model
        result = evaluate_checkpoint(str(run_dir / "finetune.ckpt"), source=eval_source(study, budget), image_size=study.image_size,
                                     out_json=str(run_dir / "eval.json"))
        record.update(
            status="ok", error=None, metrics=eval_metrics(result), train_seconds=train_seconds,
            projector_params=count_params(model.projector), visual_tokens=model.tower.num_tokens,
            align_steps_per_s=steps_per_second(align_cli), finetune_steps_per_s=steps_per_second(cli),
            cost=tower_cost(model.tower, study.image_size),
        )
    except Exception as err:  # one failing variant must not stop the study
        record.update(status="failed", error=f"{type(err).__name__}: {str(err).splitlines()[0][:300]}",
                      traceback=traceback.format_exc())
        save_json(record, run_dir / "failed.json")
        return record
    save_json(record, record_file)
    return record


def distill_student(study: Study, budget: Budget, out_dir: Path, force: bool) -> str:
    """Distill the toy student with the distill recipe (budget.distill_steps) and export it; reused when done."""
    from distill.cli import lightning_cli
    from distill.export import export_student

    recipe = yaml.safe_load(Path(study.distill_recipe).read_text())
    key = config_key(recipe, budget.distill_steps, budget.toy_profile)
    run_dir = out_dir / f"distill-{key}"
    export = run_dir / "export"
    if (export / "config.json").is_file() and not force:
        return str(export)
    print(f"[study] distilling the student ({budget.distill_steps} steps) into {run_dir}", flush=True)
    cfg = copy.deepcopy(recipe)
    trainer = cfg["trainer"]
    trainer.update(
        max_steps=budget.distill_steps, default_root_dir=str(run_dir), enable_progress_bar=False,
        val_check_interval=budget.distill_steps, limit_val_batches=2,
        logger={"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run_dir), "name": "logs"}},
        callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(run_dir), "filename": "student", "enable_version_counter": False}},
                   {"class_path": "distill.timing.StepTimer"}],
    )
    started = time.time()
    cli = lightning_cli(["fit", "-c", str(write_yaml(cfg, run_dir / "distill.yaml"))])
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    save_json({"seconds": time.time() - started, "steps": budget.distill_steps, "steps_per_second": steps_per_second(cli),
               "val": metrics}, run_dir / "distill.json")
    export_student(run_dir / "student.ckpt", export, with_adaptors=True)
    return str(export)


def fairness_header(study: Study, budget: Budget, smoke: bool, seconds: float | None = None) -> str:
    align = yaml.safe_load(Path(study.align_recipe).read_text())
    grid = f"{study.grid}x{study.grid} = {study.grid ** 2} visual tokens for every tower" if study.grid else "each tower's own grid"
    lines = [
        "# unitower baseline study" + (" (smoke)" if smoke else ""),
        "",
        f"Same for every variant: projector `{align['model'].get('projector')}`, LM `{align['model'].get('lm')}`, "
        f"toy-world data, {budget.align_steps} align + {budget.finetune_steps} finetune steps, seeds 0..{budget.seeds - 1}, "
        f"{grid}; scored on the questions of {budget.eval_images} held-out images (seed 1000). "
        f"Metrics: accuracy per question kind (yes/no, exact match, multiple choice), POPE F1 on existence; mean ± std over seeds.",
    ]
    machine = f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    lines.append(f"\nMeasured {datetime.date.today().isoformat()} on {machine}, {device}"
                 + (f"; study wall time {seconds / 60:.1f} min." if seconds is not None else "."))
    return "\n".join(lines)


def run_study(study: Study, budget: Budget, out_dir: Path, smoke: bool = False, force: bool = False,
              only: list[str] | None = None) -> Path:
    """Run every (variant, seed) and write results.md / results.csv / results.png in out_dir."""
    from distill.toy.cache import ensure_cache

    known = [v.name for v in study.variants]
    unknown = [name for name in only or [] if name not in known]
    if unknown:  # fail before any work: a typo must not give an empty table
        raise ValueError(f"--only {' '.join(unknown)}: unknown variant(s); the study's variants are {known}.")
    os.environ["UNITOWER_TOY_PROFILE"] = budget.toy_profile
    quiet_libraries()
    started = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    ensure_cache()
    variants = [v for v in study.variants if not only or v.name in only]
    student = study.student
    if student is None and any(v.kind == "student" for v in variants):
        student = distill_student(study, budget, out_dir, force)
    jobs = [(v, seed) for v in variants for seed in range(budget.seeds)]
    records = []
    for variant, seed in tqdm(jobs, desc="study runs", unit="run"):
        record = run_variant(variant, seed, study, budget, student, out_dir, force)
        tqdm.write(f"[study] {variant.name} seed {seed}: {record['status']}"
                   + (f" overall={record['metrics']['overall']:.3f}" if record["status"] == "ok" else f" {record['error']}"))
        records.append(record)
    save_json({"records": records}, out_dir / "records.json")
    header = fairness_header(study, budget, smoke, time.time() - started)
    return write_report(aggregate(records), out_dir, header)
