"""The real-scale study route (a study with `eval_json`): every (variant, seed) trains align + finetune with
its tower in the loop on the recipes' own data, answers the evaluation JSON greedily, and is scored per
question by its reference; no feature cache, probes or controls (they need the toy world's ground truth).

    online_study(study, budget, out_dir, variants, smoke=False, force=False, started=time.time())
"""

from __future__ import annotations

import copy
import json
import time
import traceback
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from distill.common.io import save_json
from mllm.study.config import Budget, Study, Variant
from mllm.study.cost import count_params, tower_cost
from mllm.study.common import build_tower, config_key, fit, steps_per_second, variant_tower, write_yaml


def online_config(recipe: dict, tower: dict, stage: str, seed: int, steps: int, run_dir: Path, study: Study) -> dict:
    """A real-scale stage: the recipe with this variant's tower, seed, steps and output paths (no feature cache:
    the recipe's own data, images through the tower at every step)."""
    cfg = copy.deepcopy(recipe)
    cfg["seed_everything"] = seed
    cfg["model"]["tower"] = tower
    trainer = cfg.setdefault("trainer", {})
    trainer.update(max_steps=steps, default_root_dir=str(run_dir / stage), limit_val_batches=0,
                   enable_checkpointing=False, callbacks=[{"class_path": "distill.common.timing.StepTimer"}],
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
    cache, probes or controls (the oracle needs ground truth that real data lacks), so the gates report the
    instrument as not validated and the learned-skill and reader gates as not measured; paired statistics as
    in the toy study."""
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
    clock = time.time()
    for variant, seed in tqdm([(v, s) for v in variants for s in range(budget.seeds)], desc="study runs", unit="run"):
        records.append(run_online_variant(variant, seed, study, budget, study.student, out_dir, force))
    phases = {"LLaVA runs": time.time() - clock}
    clock = time.time()
    costs = {v.name: tower_cost(build_tower(variant_tower(v, study, study.student)), study.image_size) for v in variants}
    phases["tower costs"] = time.time() - clock
    return write_report(records=records, items=items, prior=None, probes={}, costs=costs, distill={}, study=study,
                        budget=budget, out_dir=out_dir, smoke=smoke, seconds=time.time() - started, phases=phases)
