"""The toy study's distillations: per seed, the student variants that differ only in their student model learn
from ONE teacher pass (distill `model.students`: the teachers run once per batch for all of them), then each student
is exported on its own.

A variant shares a seed's pass when its `distill_overlay` sets nothing but `model.student` (as
configs/distill/overlays/toy_small_student.yaml does) and its name can name a `model.students` entry (a plain
identifier, not `student`, not a teacher's name). Its student is the recipe's `model.student` with the overlay's
keys put on top (nested mappings merged key by key, as `-c RECIPE -c OVERLAY` reads such an overlay). Any other
overlay gets a run of its own with `-c RECIPE -c OVERLAY`.

    jobs = distill_jobs(student_variants, seeds, recipe)   # [DistillJob(seed, members)]
    results = distill_students(study, budget, out_dir, force, job, threads=1)  # {variant: (export, summary)}
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from distill.common.io import save_json
from mllm.study.common import config_key, steps_per_second, write_yaml
from mllm.study.config import Budget, Study, Variant


@dataclass
class DistillJob:
    """One distillation run: `members` [(variant name, its overlay or None)] trained from one teacher pass; the
    first is the run's `model.student`. `separate_overlay`: an overlay read as `-c` (a run of its own)."""

    seed: int
    members: list[tuple[str, dict | None]]
    separate_overlay: dict | None = None


def merge(base: dict, top: dict) -> dict:
    """`base` with `top` put on top: nested mappings merge key by key, any other value is replaced."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else copy.deepcopy(value)
    return out


def _student_only(overlay: dict | None) -> bool:
    return overlay is None or (set(overlay) == {"model"} and set(overlay["model"]) == {"student"})


def _teacher_names(recipe: dict) -> set[str]:
    return {t.get("init_args", {}).get("name") for t in recipe.get("model", {}).get("teachers", [])}


def distill_jobs(variants: list[Variant], seeds: list[int], recipe: dict) -> list[DistillJob]:
    """The distillation runs of the student `variants` for every seed (see the module docstring), seed-major."""
    shared: list[tuple[str, dict | None]] = []
    alone: list[tuple[str, dict | None]] = []
    teachers = _teacher_names(recipe)
    for variant in variants:
        overlay = yaml.safe_load(Path(variant.distill_overlay).read_text()) if variant.distill_overlay else None
        joins = _student_only(overlay) and (not shared or (variant.name.isidentifier() and variant.name != "student"
                                                           and variant.name not in teachers))
        (shared if joins else alone).append((variant.name, overlay))
    jobs = []
    for seed in seeds:
        if shared:
            jobs.append(DistillJob(seed, shared))
        jobs += [DistillJob(seed, [member], separate_overlay=member[1]) for member in alone]
    return jobs


def job_config(recipe: dict, job: DistillJob) -> dict:
    """The recipe for `job`: the first member's student as `model.student`, every other member's as a
    `model.students` entry named after its variant."""
    cfg = copy.deepcopy(recipe)
    if job.separate_overlay is not None:
        return cfg  # the overlay is read by the CLI (`-c`), on top of this
    first, *extra = job.members
    cfg["model"]["student"] = merge(recipe, first[1] or {})["model"]["student"]
    if extra:
        cfg["model"]["students"] = list(cfg["model"].get("students") or []) + [
            {"class_path": "distill.students.StudentSpec",
             "init_args": {"name": name, "student": merge(recipe, overlay or {})["model"]["student"]}}
            for name, overlay in extra]
    return cfg


def member_metrics(metrics: dict[str, float], job: DistillJob, position: int, teachers: set[str]) -> dict[str, float]:
    """The validation metrics of the job's `position`-th student, keyed `val/<teacher>/<metric>` (extra students
    log `val/<name>/<teacher>/<metric>`); `val/loss` only for a one-student run (else it is the sum over them)."""
    if len(job.members) == 1:
        return dict(metrics)
    prefix = "val/" if position == 0 else f"val/{job.members[position][0]}/"
    return {f"val/{key[len(prefix):]}": value for key, value in metrics.items()
            if key.startswith(prefix) and key[len(prefix):].split("/")[0] in teachers}


def distill_students(study: Study, budget: Budget, out_dir: Path, force: bool, job: DistillJob,
                     threads: int | None = None) -> dict[str, tuple[str, dict]]:
    """Run `job` (budget.distill_steps, seed job.seed) and export each member; reused when done.
    `threads`: torch threads for this run (None: the process's). Returns {variant: (export folder, summary)}."""
    import torch

    from distill.cli import lightning_cli
    from distill.export import export_student

    recipe = yaml.safe_load(Path(study.distill_recipe).read_text())
    cfg = job_config(recipe, job)
    parts = [cfg, job.separate_overlay] if job.separate_overlay is not None else cfg
    key = config_key(parts, budget.distill_steps, budget.toy_profile)
    run_dir = out_dir / f"distill-{key}-seed{job.seed}"
    names = [name for name, _ in job.members]
    suffixes = {name: "" if position == 0 else f"-{name}" for position, name in enumerate(names)}  # model.student: ""
    exports = {name: run_dir / f"export{suffix}" for name, suffix in suffixes.items()}
    summaries = {name: run_dir / f"distill{suffix}.json" for name, suffix in suffixes.items()}
    if not force and all((exports[n] / "config.json").is_file() and summaries[n].is_file() for n in exports):
        return {n: (str(exports[n]), json.loads(summaries[n].read_text())) for n in exports}
    print(f"[study] distilling {' + '.join(names)} seed {job.seed} ({budget.distill_steps} steps, one teacher pass) "
          f"into {run_dir}", flush=True)
    cfg["seed_everything"] = job.seed
    cfg["trainer"].update(
        max_steps=budget.distill_steps, default_root_dir=str(run_dir), enable_progress_bar=False,
        val_check_interval=budget.distill_steps, limit_val_batches=2,
        logger={"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run_dir), "name": "logs"}},
        callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(run_dir), "filename": "student", "enable_version_counter": False}},
                   {"class_path": "distill.common.timing.StepTimer"}],
    )
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        started = time.time()
        args = ["fit", "-c", str(write_yaml(cfg, run_dir / "distill.yaml"))]
        if job.separate_overlay is not None:
            args += ["-c", str(write_yaml(job.separate_overlay, run_dir / "overlay.yaml"))]
        cli = lightning_cli(args)
        metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
        seconds, rate = time.time() - started, steps_per_second(cli)
    finally:
        torch.set_num_threads(before)
    teachers = _teacher_names(recipe)
    results = {}
    for position, name in enumerate(names):
        export_student(run_dir / "student.ckpt", exports[name], with_adaptors=True,
                       student="student" if position == 0 else name)
        info = {"seed": job.seed, "seconds": seconds, "steps": budget.distill_steps, "steps_per_second": rate,
                "threads": threads or before, "shared_with": [n for n in names if n != name],
                "val": member_metrics(metrics, job, position, teachers)}
        save_json(info, summaries[name])
        results[name] = (str(exports[name]), info)
    return results
