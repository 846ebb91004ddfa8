"""The toy study route: distill the students of each seed (one teacher pass for those that can share it:
mllm/study/distill_jobs.py), cache every frozen tower's visual tokens once, fit linear
probes on them, train LLaVA (align + finetune) per variant and seed on the cached tokens, score the
held-out questions by likelihood, and write the report with paired statistics.

Variants: towers (single encoders, ensembles, the student) and two controls with no tower: `blind`
(constant tokens) and `oracle` (tokens built from the generator's ground truth), both from
mllm/study/instrument.py. Towers are frozen, so their tokens for the training and evaluation images are
computed once (mllm/features.py) and the LLaVA loop pays only for the fusion module (if any) + projector + LM;
every variant, seed and control uses the same recipes, steps, data order and questions.

Layout of OUT: features/ (cached tokens), distill-<key>-seed<k>/ (student runs; export/ and export-<variant>/),
runs/<variant>/seed<k>-<key>/ (align.yaml, finetune.yaml, eval.json, record.json: written last, so a run
with a record.json is finished and reused), questions.json, probes.json, records.json, results.*.
"""

from __future__ import annotations

import copy
import json
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from distill.common.io import save_json
from mllm.study.config import Budget, Study, Variant
from mllm.study.cost import count_params
from mllm.study.distill_jobs import distill_jobs, distill_students
from mllm.study.instrument import Features, probe_variant, questions, text_prior
from mllm.study.common import config_key, fit, steps_per_second, write_yaml
from mllm.study.workers import Workers


def cached_tower(features: str, tower: dict | None, study: Study) -> dict:
    """The CachedTower config that applies `tower`'s fusion, grid and norm (a control: no tower, "channel") to the
    cached features."""
    args = (tower or {}).get("init_args", {})
    return {"class_path": "mllm.features.CachedTower",
            "init_args": {"features": features, "fusion": copy.deepcopy(args.get("fusion", "channel")),
                          "grid": args.get("grid", study.grid), "norm": args.get("norm", study.norm)}}


def stage_config(recipe: dict, stage: str, seed: int, steps: int, run_dir: Path, features: str,
                 study: Study, budget: Budget, tower: dict | None = None) -> dict:
    """The recipe on cached features: a CachedTower with the variant `tower`'s fusion and norm (None: a control),
    the training world with `features`, this seed and steps."""
    cfg = copy.deepcopy(recipe)
    cfg["seed_everything"] = seed
    cfg["model"]["tower"] = cached_tower(features, tower, study)
    trainer = cfg.setdefault("trainer", {})
    trainer.update(
        max_steps=steps, default_root_dir=str(run_dir / stage), limit_val_batches=0, enable_progress_bar=False,
        enable_model_summary=False, log_every_n_steps=max(1, min(50, steps)), enable_checkpointing=False,
        logger={"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run_dir), "name": stage}},
        callbacks=[{"class_path": "distill.common.timing.StepTimer"}],
    )
    trainer.pop("val_check_interval", None)
    data = cfg.setdefault("data", {})
    data["image_size"] = study.image_size
    data["val"] = None
    train = data["train"].setdefault("init_args", {})
    train.update(seed=0, num_images=budget.train_images, image_size=study.image_size, features=features,
                 max_objects=study.max_objects)
    if stage == "finetune":
        train.update(records_per_image=budget.records_per_image)
    return cfg


def run_variant(variant: Variant, seed: int, paths: dict[int, str], study: Study, budget: Budget,
                out_dir: Path, force: bool, tower: dict | None = None) -> dict:
    """Train align + finetune on cached tokens, score the held-out questions; return (and store) the record."""
    from distill.toy.world import HELDOUT_SEED, TRAIN_SEED
    from mllm.data import ToySource
    from mllm.loading import load_tokenizer
    from mllm.scoring import rank_answers

    align_recipe = yaml.safe_load(Path(study.align_recipe).read_text())
    finetune_recipe = yaml.safe_load(Path(study.finetune_recipe).read_text())
    key = config_key(paths, align_recipe, finetune_recipe, seed, budget.align_steps, budget.finetune_steps,
                     budget.records_per_image, budget.eval_images, cached_tower("", tower, study))
    run_dir = out_dir / "runs" / variant.name / f"seed{seed}-{key}"
    record_file = run_dir / "record.json"
    if record_file.is_file() and not force:
        return json.loads(record_file.read_text())
    record = {"variant": variant.name, "kind": variant.kind, "seed": seed, "run_dir": str(run_dir)}
    started = time.time()
    try:
        align = stage_config(align_recipe, "align", seed, budget.align_steps, run_dir, paths[TRAIN_SEED], study, budget,
                             tower)
        align["model"]["init_from"] = None
        align_cli = fit(write_yaml(align, run_dir / "align.yaml"))
        align_ckpt = run_dir / "align.ckpt"
        align_cli.trainer.save_checkpoint(align_ckpt, weights_only=True)
        finetune = stage_config(finetune_recipe, "finetune", seed, budget.finetune_steps, run_dir, paths[TRAIN_SEED],
                                study, budget, tower)
        finetune["model"]["init_from"] = str(align_ckpt)
        cli = fit(write_yaml(finetune, run_dir / "finetune.yaml"))
        align_ckpt.unlink(missing_ok=True)  # the finetuned weights are what the study scores
        train_seconds = time.time() - started
        model = cli.model.model
        source = ToySource(seed=HELDOUT_SEED, num_images=budget.eval_images, stage="finetune",
                           image_size=study.image_size, features=paths[HELDOUT_SEED], max_objects=study.max_objects)
        items = source.eval_items()
        hp = cli.model.hparams
        predictions = rank_answers(model, load_tokenizer(hp.lm), items, hp.chat_template, image_size=study.image_size)
        correct = [int(p == i.answer) for p, i in zip(predictions, items)]
        save_json({"predictions": predictions, "correct": correct}, run_dir / "eval.json")
        record.update(
            status="ok", error=None, accuracy=float(np.mean(correct)), train_seconds=train_seconds,
            eval_seconds=time.time() - started - train_seconds, projector_params=count_params(model.projector),
            fusion_params=count_params(model.tower.fusion),
            visual_tokens=model.tower.num_tokens, align_steps_per_s=steps_per_second(align_cli),
            finetune_steps_per_s=steps_per_second(cli),
        )
    except Exception as err:  # one failing variant must not stop the study
        record.update(status="failed", error=f"{type(err).__name__}: {str(err).splitlines()[0][:300]}",
                      traceback=traceback.format_exc())
        save_json(record, run_dir / "failed.json")
        return {**record, "started_at": started}
    save_json(record, record_file)
    return {**record, "started_at": started}  # when it began (epoch seconds): the study's LLaVA-runs phase


def toy_study(study: Study, budget: Budget, out_dir: Path, variants: list[Variant], smoke: bool, force: bool,
              started: float) -> Path:
    """The toy study (see the module docstring) of `variants`; returns the results.md path.

    After the toy build, one queue of `budget.workers` one-thread processes (mllm/study/workers.py) takes the
    distillations first, then every LLaVA run as its tokens are ready, while this process (one thread beside the
    workers) computes the features and probes: the towers' without a student while the students distil, the
    students' when their distillation is done."""
    from distill.toy.cache import ensure_cache
    from distill.toy.world import HELDOUT_SEED, TRAIN_SEED
    from mllm.study.probes import object_labels
    from mllm.study.report import write_report

    phases: dict[str, float] = {}  # wall seconds per phase, in the report and records.json (the last four overlap)
    clock = time.time()
    ensure_cache()
    phases["toy build"] = time.time() - clock
    seeds = list(range(budget.seeds))
    students: dict[str, dict[int, str]] = {}  # {variant: {seed: export folder}}
    distill_info: dict[str, dict[int, dict]] = {}
    learners = []  # student variants to distill (one teacher pass per seed for those that can share it)
    for variant in (v for v in study.variants if v.kind == "student"):
        if study.student is not None and variant.distill_overlay is None:
            students[variant.name] = {seed: study.student for seed in seeds}
        else:
            learners.append(variant)
    # the jobs of the whole study (so a run folder is the same whatever --only picks), those with a selected student
    selected = {v.name for v in variants}
    recipe = yaml.safe_load(Path(study.distill_recipe).read_text())
    passes = [job for job in distill_jobs(learners, seeds, recipe) if selected & {name for name, _ in job.members}]
    waiting = {v.name for v in learners}  # variants whose tokens need this invocation's distillations
    runs = [(variant, seed) for variant in variants for seed in seeds]  # report order
    records: list[dict | None] = [None] * len(runs)
    probes: dict[str, list[dict]] = {name: [] for name in [v.name for v in variants] + [
        f"untrained_{v.name}" for v in variants if v.name in study.probe_controls.untrained]
        + (["pixels"] if study.probe_controls.pixels else [])}
    phases.update({"distillation": 0.0, "features": 0.0, "probes": 0.0, "LLaVA runs": 0.0})
    threads = torch.get_num_threads()
    with Workers(budget.workers, budget.toy_profile) as pool:
        if pool.parallel:
            torch.set_num_threads(1)  # this process computes features beside the workers
        try:
            clock = time.time()
            distilling = [pool.submit(distill_students, study, budget, out_dir, force, job, 1 if pool.parallel else None)
                          for job in passes]
            ended: list[float] = []  # when each distillation finished (its callback runs then)
            for future in distilling:
                future.add_done_callback(lambda _: ended.append(time.time()))
            features = Features(study, budget, out_dir, students)
            objects = {TRAIN_SEED: object_labels(TRAIN_SEED, budget.probe_images, study.image_size, study.max_objects),
                       HELDOUT_SEED: object_labels(HELDOUT_SEED, budget.eval_images, study.image_size, study.max_objects)}
            items = questions(study, budget)
            save_json({"questions": items}, out_dir / "questions.json")
            progress = tqdm(total=len(runs), desc="study runs", unit="run")
            pending: dict = {}

            def measure(name: str, paths: dict[int, str]) -> None:
                moment = time.time()
                probes[name].append(probe_variant(paths, study, budget, objects))
                phases["probes"] += time.time() - moment

            def finished(future) -> None:
                if future.exception() is None:
                    record = future.result()
                    progress.update(1)
                    tqdm.write(f"[study] {record['variant']} seed {record['seed']}: {record['status']}"
                               + (f" accuracy={record['accuracy']:.3f}" if record["status"] == "ok"
                                  else f" {record['error']}"))

            def start_runs(variant: Variant) -> None:
                """Features (and probes) of the variant's seeds, then its runs into the queue."""
                for seed in seeds:
                    moment = time.time()
                    paths = features.paths(variant, seed)
                    phases["features"] += time.time() - moment
                    if variant.kind == "student" or seed == 0:
                        measure(variant.name, paths)
                    future = pool.submit(run_variant, variant, seed, paths, study, budget, out_dir, force,
                                         features.tower_config(variant, seed))
                    pending[future] = runs.index((variant, seed))
                    future.add_done_callback(finished)  # progress as runs end (now, for a run done in this process)

            for variant in (v for v in variants if v.name not in waiting):
                start_runs(variant)
            for variant in (v for v in variants if v.name in study.probe_controls.untrained):  # probe-only controls
                moment = time.time()
                paths = features.untrained_paths(variant)
                phases["features"] += time.time() - moment
                measure(f"untrained_{variant.name}", paths)
            if study.probe_controls.pixels:
                moment = time.time()
                paths = features.pixel_paths()
                phases["features"] += time.time() - moment
                measure("pixels", paths)
            for job, future in zip(passes, distilling):
                for name, (export, info) in future.result().items():
                    if name in selected:
                        students.setdefault(name, {})[job.seed] = export
                        distill_info.setdefault(name, {})[job.seed] = info
            phases["distillation"] = max(ended) - clock if ended else 0.0
            for name in list(students):
                students[name] = dict(sorted(students[name].items()))
            distill_info = {name: dict(sorted(by_seed.items())) for name, by_seed in distill_info.items()}
            for variant in (v for v in variants if v.name in waiting):
                start_runs(variant)
            for future, index in pending.items():
                records[index] = future.result()
            progress.close()
        finally:
            torch.set_num_threads(threads)
    began = [r["started_at"] for r in records if r.get("started_at", 0) >= clock]  # runs trained now, not reused
    phases["LLaVA runs"] = time.time() - min(began) if began else 0.0
    return write_report(
        records=records, items=items, prior=text_prior(study, budget, items), probes=probes, costs=features.costs,
        distill=distill_info, study=study, budget=budget, out_dir=out_dir, smoke=smoke,
        seconds=time.time() - started, phases=phases,
    )
