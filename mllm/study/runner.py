"""Run the study: distill one student per seed, cache every frozen tower's visual tokens once, fit linear
probes on them, train LLaVA (align + finetune) per variant and seed on the cached tokens, score the
held-out questions by likelihood, and write the report with paired statistics.

Variants: towers (single encoders, ensembles, the student) and two controls with no tower: `blind`
(constant tokens) and `oracle` (tokens built from the generator's ground truth). Towers are frozen, so
their tokens for the training and evaluation images are computed once (mllm/features.py) and the LLaVA
loop pays only for projector + LM; every variant, seed and control uses the same recipes, steps, data
order and questions.

Layout of OUT: features/ (cached tokens), distill-<key>-seed<k>/ (student runs + exports),
runs/<variant>/seed<k>-<key>/ (align.yaml, finetune.yaml, eval.json, record.json: written last, so a run
with a record.json is finished and reused), questions.json, probes.json, records.json, results.*.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from distill.io import atomic_write, save_json
from mllm.study.config import STUDENT_PLACEHOLDER, Budget, Study, Variant
from mllm.study.cost import count_params, tower_cost


def config_key(*parts: object) -> str:
    """Short stable hash of JSON-serialisable parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def write_yaml(cfg: dict, path: Path) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(yaml.safe_dump(cfg, sort_keys=False)))


def select_variants(study: Study, only: list[str] | None) -> list[Variant]:
    """The variants to run (all, or those named in `only`; an unknown name is an error naming the known ones)."""
    known = [v.name for v in study.variants]
    unknown = [name for name in only or [] if name not in known]
    if unknown:
        raise ValueError(f"--only {' '.join(unknown)}: unknown variant(s); the study's variants are {known}.")
    return [v for v in study.variants if not only or v.name in only]


def stage_config(recipe: dict, stage: str, seed: int, steps: int, run_dir: Path, features: str,
                 study: Study, budget: Budget) -> dict:
    """The recipe on cached tokens: CachedTower, the training world with `features`, this seed and steps."""
    cfg = copy.deepcopy(recipe)
    cfg["seed_everything"] = seed
    cfg["model"]["tower"] = {"class_path": "mllm.features.CachedTower", "init_args": {"features": features, "whiten": True}}
    trainer = cfg.setdefault("trainer", {})
    trainer.update(
        max_steps=steps, default_root_dir=str(run_dir / stage), limit_val_batches=0, enable_progress_bar=False,
        enable_model_summary=False, log_every_n_steps=max(1, min(50, steps)), enable_checkpointing=False,
        logger={"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run_dir), "name": stage}},
        callbacks=[{"class_path": "distill.timing.StepTimer"}],
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


def build_tower(config: dict):
    """Instantiate a tower from its class_path/init_args config (as the CLI would)."""
    from jsonargparse import ArgumentParser

    from mllm.towers import VisionTower

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--tower", type=VisionTower)
    return parser.instantiate_classes(parser.parse_object({"tower": copy.deepcopy(config)})).tower  # parsing mutates


def quiet_libraries() -> None:
    """Keep the study's console to one line per run: Lightning's per-run banners and known warnings off."""
    import logging
    import warnings

    for name in ("lightning.pytorch", "lightning.fabric", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for message in ("Found keys that are in the model state dict", "Found .* module\\(s\\) in eval mode",
                    "LightningCLI's args parameter", "Checkpoint directory .* exists", "The number of training batches",
                    "The '.*_dataloader' does not have many workers"):
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


class Features:
    """Cached tokens (train + eval images) of every variant and seed, computed on first request."""

    def __init__(self, study: Study, budget: Budget, out_dir: Path, students: dict[str, dict[int, str]]) -> None:
        self.study, self.budget, self.students = study, budget, students
        self.folder = out_dir / "features"
        self._images: dict[int, torch.Tensor] = {}
        self._towers: dict[str, object] = {}
        self.costs: dict[str, dict] = {}

    def images(self, seed: int) -> torch.Tensor:
        from mllm.features import toy_images

        if seed not in self._images:
            count = self.budget.train_images if seed == 0 else self.budget.eval_images
            self._images[seed] = toy_images(seed, count, self.study.image_size, self.study.max_objects)
        return self._images[seed]

    def tower(self, config: dict):
        """The tower of `config`, built once."""
        key = json.dumps(config, sort_keys=True, default=str)
        if key not in self._towers:
            self._towers[key] = build_tower(config)
        return self._towers[key]

    def paths(self, variant: Variant, seed: int) -> dict[int, str]:
        """{world seed: cache file} for the training (0) and held-out (1000) images; measures the tower's
        cost (parameters, GFLOPs, ms per image) the first time a variant is seen."""
        from distill.toy.world import HELDOUT_SEED, TRAIN_SEED
        from mllm.features import blind_tokens, cache_features, oracle_tokens, tower_tokens

        size, grid = self.study.image_size, self.study.grid or 8
        if variant.kind == "control":
            config = {"control": variant.control, "grid": grid}
            make = {"blind": lambda world, n: blind_tokens(n, grid),
                    "oracle": lambda world, n: oracle_tokens(world, n, size, grid, self.study.max_objects)}[variant.control]
            self.costs.setdefault(variant.name, {"tower_params_m": 0.0, "gflops_per_image": 0.0, "ms_per_image": 0.0})
        else:
            student = self.students.get(variant.name, {}).get(seed) if variant.kind == "student" else None
            config = variant_tower(variant, self.study, student)
            if variant.name not in self.costs:
                self.costs[variant.name] = tower_cost(self.tower(config), size)

            def make(world: int, n: int) -> torch.Tensor:
                return tower_tokens(self.tower(config), self.images(world), desc=f"{variant.name} tokens")
        out = {}
        for world, count in ((TRAIN_SEED, self.budget.train_images), (HELDOUT_SEED, self.budget.eval_images)):
            out[world] = str(cache_features(lambda: make(world, count), variant.name, config, world, count, size,
                                            self.folder, self.study.max_objects))
        return out


def probe_variant(paths: dict[int, str], study: Study, budget: Budget, objects: dict[int, list]) -> dict[str, float]:
    """Ridge-probe accuracies of a variant's cached tokens (mllm/study/probes.py)."""
    from distill.toy.world import HELDOUT_SEED, TRAIN_SEED
    from mllm.features import load_features
    from mllm.study.probes import probe_accuracies

    train = load_features(paths[TRAIN_SEED], TRAIN_SEED, study.image_size, budget.probe_images, study.max_objects)
    test = load_features(paths[HELDOUT_SEED], HELDOUT_SEED, study.image_size, budget.eval_images, study.max_objects)
    return probe_accuracies(train, objects[TRAIN_SEED], test, objects[HELDOUT_SEED], study.grid or 8)


def run_variant(variant: Variant, seed: int, paths: dict[int, str], study: Study, budget: Budget,
                out_dir: Path, force: bool) -> dict:
    """Train align + finetune on cached tokens, score the held-out questions; return (and store) the record."""
    from distill.toy.world import HELDOUT_SEED, TRAIN_SEED
    from mllm.data import ToySource
    from mllm.loading import load_tokenizer
    from mllm.scoring import rank_answers

    align_recipe = yaml.safe_load(Path(study.align_recipe).read_text())
    finetune_recipe = yaml.safe_load(Path(study.finetune_recipe).read_text())
    key = config_key(paths, align_recipe, finetune_recipe, seed, budget.align_steps, budget.finetune_steps,
                     budget.records_per_image, budget.eval_images)
    run_dir = out_dir / "runs" / variant.name / f"seed{seed}-{key}"
    record_file = run_dir / "record.json"
    if record_file.is_file() and not force:
        return json.loads(record_file.read_text())
    record = {"variant": variant.name, "kind": variant.kind, "seed": seed, "run_dir": str(run_dir)}
    started = time.time()
    try:
        align = stage_config(align_recipe, "align", seed, budget.align_steps, run_dir, paths[TRAIN_SEED], study, budget)
        align["model"]["init_from"] = None
        align_cli = fit(write_yaml(align, run_dir / "align.yaml"))
        align_ckpt = run_dir / "align.ckpt"
        align_cli.trainer.save_checkpoint(align_ckpt, weights_only=True)
        finetune = stage_config(finetune_recipe, "finetune", seed, budget.finetune_steps, run_dir, paths[TRAIN_SEED],
                                study, budget)
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
            visual_tokens=model.tower.num_tokens, align_steps_per_s=steps_per_second(align_cli),
            finetune_steps_per_s=steps_per_second(cli),
        )
    except Exception as err:  # one failing variant must not stop the study
        record.update(status="failed", error=f"{type(err).__name__}: {str(err).splitlines()[0][:300]}",
                      traceback=traceback.format_exc())
        save_json(record, run_dir / "failed.json")
        return record
    save_json(record, record_file)
    return record


def _worker_init(profile: str) -> None:
    """A run worker: one torch thread (the workers share the cores), the toy profile, quiet libraries."""
    os.environ["UNITOWER_TOY_PROFILE"] = profile
    torch.set_num_threads(1)
    quiet_libraries()


def run_jobs(jobs: list[tuple[Variant, int, dict]], study: Study, budget: Budget, out_dir: Path, force: bool) -> list[dict]:
    """Every (variant, seed) LLaVA run, `budget.workers` at a time in separate processes (one torch thread
    each: a small LM's step is dominated by per-op overhead, so processes scale where threads do not)."""
    import concurrent.futures
    import multiprocessing

    records: list[dict | None] = [None] * len(jobs)
    progress = tqdm(total=len(jobs), desc="study runs", unit="run")

    def done(index: int, record: dict) -> None:
        records[index] = record
        progress.update(1)
        tqdm.write(f"[study] {record['variant']} seed {record['seed']}: {record['status']}"
                   + (f" accuracy={record['accuracy']:.3f}" if record["status"] == "ok" else f" {record['error']}"))

    if budget.workers <= 1:
        for index, (variant, seed, paths) in enumerate(jobs):
            done(index, run_variant(variant, seed, paths, study, budget, out_dir, force))
    else:
        with concurrent.futures.ProcessPoolExecutor(budget.workers, mp_context=multiprocessing.get_context("spawn"),
                                                    initializer=_worker_init, initargs=(budget.toy_profile,)) as pool:
            futures = {pool.submit(run_variant, variant, seed, paths, study, budget, out_dir, force): index
                       for index, (variant, seed, paths) in enumerate(jobs)}
            for future in concurrent.futures.as_completed(futures):
                done(futures[future], future.result())
    progress.close()
    return records


def online_config(recipe: dict, tower: dict, stage: str, seed: int, steps: int, run_dir: Path, study: Study) -> dict:
    """A real-scale stage: the recipe with this variant's tower, seed, steps and output paths (no feature cache:
    the recipe's own data, images through the tower at every step)."""
    cfg = copy.deepcopy(recipe)
    cfg["seed_everything"] = seed
    cfg["model"]["tower"] = tower
    trainer = cfg.setdefault("trainer", {})
    trainer.update(max_steps=steps, default_root_dir=str(run_dir / stage), limit_val_batches=0,
                   enable_checkpointing=False, callbacks=[{"class_path": "distill.timing.StepTimer"}],
                   logger={"class_path": "lightning.pytorch.loggers.CSVLogger",
                           "init_args": {"save_dir": str(run_dir), "name": stage}})
    trainer.pop("val_check_interval", None)
    cfg.setdefault("data", {})["image_size"] = study.image_size
    return cfg


def run_online_variant(variant: Variant, seed: int, study: Study, budget: Budget, student: str | None,
                       out_dir: Path, force: bool) -> dict:
    """Real-scale run (a study with `eval_json`): align + finetune with the tower in the loop, then greedy
    answers to the evaluation JSON, each scored by its reference (choice, yes/no, exact match)."""
    from mllm.data import LlavaJsonSource
    from mllm.features import weights_identity
    from mllm.generate import generate_answers
    from mllm.loading import load_tokenizer
    from mllm.metrics import correctness

    tower = variant_tower(variant, study, student)
    align_recipe = yaml.safe_load(Path(study.align_recipe).read_text())
    finetune_recipe = yaml.safe_load(Path(study.finetune_recipe).read_text())
    key = config_key(tower, align_recipe, finetune_recipe, seed, budget.align_steps, budget.finetune_steps,
                     budget.eval_images, study.image_size, study.eval_json, weights_identity(tower))
    run_dir = out_dir / "runs" / variant.name / f"seed{seed}-{key}"
    if (run_dir / "record.json").is_file() and not force:
        return json.loads((run_dir / "record.json").read_text())
    record = {"variant": variant.name, "kind": variant.kind, "seed": seed, "run_dir": str(run_dir)}
    started = time.time()
    try:
        align = online_config(align_recipe, tower, "align", seed, budget.align_steps, run_dir, study)
        align["model"]["init_from"] = None
        align_cli = fit(write_yaml(align, run_dir / "align.yaml"))
        align_cli.trainer.save_checkpoint(run_dir / "align.ckpt", weights_only=True)
        finetune = online_config(finetune_recipe, tower, "finetune", seed, budget.finetune_steps, run_dir, study)
        finetune["model"]["init_from"] = str(run_dir / "align.ckpt")
        cli = fit(write_yaml(finetune, run_dir / "finetune.yaml"))
        cli.trainer.save_checkpoint(run_dir / "finetune.ckpt", weights_only=True)
        train_seconds = time.time() - started
        items = LlavaJsonSource(study.eval_json, study.eval_image_folder).eval_items(budget.eval_images or None)
        data = cli.datamodule
        predictions = generate_answers(cli.model.model, load_tokenizer(cli.model.hparams.lm), items, study.image_size,
                                       chat_template=cli.model.hparams.chat_template, system_prompt=data.system_prompt,
                                       pad_to_square=data.pad_to_square, pad_color=data.pad_color)
        correct = correctness(predictions, [i.answer for i in items], [i.options for i in items])
        save_json({"predictions": predictions, "correct": correct}, run_dir / "eval.json")
        record.update(status="ok", error=None, accuracy=float(np.mean(correct)), train_seconds=train_seconds,
                      projector_params=count_params(cli.model.model.projector),
                      align_steps_per_s=steps_per_second(align_cli), finetune_steps_per_s=steps_per_second(cli))
    except Exception as err:  # one failing variant must not stop the study
        record.update(status="failed", error=f"{type(err).__name__}: {str(err).splitlines()[0][:300]}",
                      traceback=traceback.format_exc())
        save_json(record, run_dir / "failed.json")
        return record
    save_json(record, run_dir / "record.json")
    return record


def online_study(study: Study, budget: Budget, out_dir: Path, variants: list[Variant], smoke: bool, force: bool,
                 started: float) -> Path:
    """The real-scale study (`eval_json` set): every (variant, seed) with its tower in the loop; no feature
    cache, probes or controls (the oracle needs ground truth that real data lacks), so the gate reports the
    instrument as not validated; paired statistics as in the toy study."""
    from mllm.data import LlavaJsonSource
    from mllm.study.report import write_report

    if any(v.kind == "control" for v in variants):
        raise ValueError("control variants (blind, oracle) need the toy world; remove them from a study with eval_json.")
    if study.student is None and any(v.kind == "student" for v in variants):
        raise ValueError("a real-scale study needs `student:` (an export folder): distill it first with "
                         "`python -m distill fit -c configs/distill/radio_b16.yaml` and `python -m distill export`.")
    items = [{"question": i.question, "answer": i.answer, "kind": i.kind, "image": index}
             for index, i in enumerate(LlavaJsonSource(study.eval_json, study.eval_image_folder)
                                       .eval_items(budget.eval_images or None))]
    save_json({"questions": items}, out_dir / "questions.json")
    records = []
    for variant, seed in tqdm([(v, s) for v in variants for s in range(budget.seeds)], desc="study runs", unit="run"):
        records.append(run_online_variant(variant, seed, study, budget, study.student, out_dir, force))
    costs = {v.name: tower_cost(build_tower(variant_tower(v, study, study.student)), study.image_size) for v in variants}
    save_json({"records": records, "costs": costs}, out_dir / "records.json")
    return write_report(records=records, items=items, prior=None, probes={}, costs=costs, distill={}, study=study,
                        budget=budget, out_dir=out_dir, smoke=smoke, seconds=time.time() - started)


def distill_student(study: Study, budget: Budget, out_dir: Path, force: bool, seed: int,
                    overlay: str | None = None) -> tuple[str, dict]:
    """Distill the toy student with seed `seed` (budget.distill_steps) and export it; reused when done.
    `overlay`: a distill overlay YAML put on top of the recipe (`-c recipe -c overlay`), e.g. a smaller student.
    Returns the export folder and the distillation summary (validation cosines, time)."""
    from distill.cli import lightning_cli
    from distill.export import export_student

    recipe = yaml.safe_load(Path(study.distill_recipe).read_text())
    overlay_cfg = yaml.safe_load(Path(overlay).read_text()) if overlay else None
    key = config_key([recipe, overlay_cfg] if overlay else recipe, budget.distill_steps, budget.toy_profile)
    run_dir = out_dir / f"distill-{key}-seed{seed}"
    export, summary = run_dir / "export", run_dir / "distill.json"
    if (export / "config.json").is_file() and summary.is_file() and not force:
        return str(export), json.loads(summary.read_text())
    print(f"[study] distilling student seed {seed} ({budget.distill_steps} steps) into {run_dir}", flush=True)
    cfg = copy.deepcopy(recipe)
    cfg["seed_everything"] = seed
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
    args = ["fit", "-c", str(write_yaml(cfg, run_dir / "distill.yaml"))]
    if overlay:
        args += ["-c", str(write_yaml(overlay_cfg, run_dir / "overlay.yaml"))]
    cli = lightning_cli(args)
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    export_student(run_dir / "student.ckpt", export, with_adaptors=True)
    info = {"seed": seed, "seconds": time.time() - started, "steps": budget.distill_steps,
            "steps_per_second": steps_per_second(cli), "val": metrics}
    save_json(info, summary)
    return str(export), info


def questions(study: Study, budget: Budget) -> list[dict]:
    """The held-out questions every run answers (question, answer, kind, image id), in scoring order."""
    from distill.toy.world import HELDOUT_SEED
    from mllm.data import ToySource

    source = ToySource(seed=HELDOUT_SEED, num_images=budget.eval_images, stage="finetune", image_size=study.image_size,
                       max_objects=study.max_objects)
    return [{"question": i.question, "answer": i.answer, "kind": i.kind, "image": i.image_id} for i in source.eval_items()]


def text_prior(study: Study, budget: Budget, items: list[dict]) -> list[int]:
    """Correctness of the best image-blind answerer: the most frequent training answer for each question text
    (over every question of the training images)."""
    from collections import Counter, defaultdict

    from distill.toy.world import TRAIN_SEED, ToyWorld

    world = ToyWorld(seed=TRAIN_SEED, image_size=study.image_size, max_objects=study.max_objects)
    answers: dict[str, Counter] = defaultdict(Counter)
    for index in range(budget.probe_images):
        for qa in world[index].qa:
            answers[qa.question][qa.answer] += 1
    best = {text: counts.most_common(1)[0][0] for text, counts in answers.items()}
    return [int(best.get(i["question"]) == i["answer"]) for i in items]


def run_study(study: Study, budget: Budget, out_dir: Path, smoke: bool = False, force: bool = False,
              only: list[str] | None = None) -> Path:
    """Run every (variant, seed) and write results.md / results.csv / results.png in out_dir."""
    from distill.toy.cache import ensure_cache
    from distill.toy.world import HELDOUT_SEED, TRAIN_SEED
    from mllm.study.probes import object_labels
    from mllm.study.report import write_report

    variants = select_variants(study, only)  # before any work: a typo must not give an empty table
    os.environ["UNITOWER_TOY_PROFILE"] = budget.toy_profile
    quiet_libraries()
    started = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    if study.eval_json:
        return online_study(study, budget, out_dir, variants, smoke, force, started)
    ensure_cache()
    seeds = list(range(budget.seeds))
    students: dict[str, dict[int, str]] = {}  # {variant: {seed: export folder}}
    distill_info: dict[str, dict[int, dict]] = {}
    for variant in (v for v in variants if v.kind == "student"):
        for seed in seeds:
            if study.student is not None and variant.distill_overlay is None:
                students.setdefault(variant.name, {})[seed] = study.student
            else:
                students.setdefault(variant.name, {})[seed], distill_info.setdefault(variant.name, {})[seed] = \
                    distill_student(study, budget, out_dir, force, seed, variant.distill_overlay)
    features = Features(study, budget, out_dir, students)
    objects = {TRAIN_SEED: object_labels(TRAIN_SEED, budget.probe_images, study.image_size, study.max_objects),
               HELDOUT_SEED: object_labels(HELDOUT_SEED, budget.eval_images, study.image_size, study.max_objects)}
    items = questions(study, budget)
    save_json({"questions": items}, out_dir / "questions.json")
    probes: dict[str, list[dict]] = {}
    jobs = []
    for variant in variants:  # features and probes first (in this process), then the LLaVA runs
        for seed in seeds:
            paths = features.paths(variant, seed)
            if variant.kind == "student" or seed == 0:
                probes.setdefault(variant.name, []).append(probe_variant(paths, study, budget, objects))
            jobs.append((variant, seed, paths))
    records = run_jobs(jobs, study, budget, out_dir, force)
    save_json({"records": records, "costs": features.costs, "probes": probes, "distill": distill_info},
              out_dir / "records.json")
    return write_report(
        records=records, items=items, prior=text_prior(study, budget, items), probes=probes, costs=features.costs,
        distill=distill_info, study=study, budget=budget, out_dir=out_dir, smoke=smoke,
        seconds=time.time() - started,
    )
