"""Pieces both study routes share (mllm/study/toy.py and mllm/study/online.py): variant selection, tower
configs and their instantiation, run keys, YAML writing, the Lightning fit call and its step timing.

    tower = build_tower(variant_tower(variant, study, student=None))
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import yaml

from distill.common.io import atomic_write
from mllm.study.config import STUDENT_PLACEHOLDER, Study, Variant


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


def variant_tower(variant: Variant, study: Study, student: str | None) -> dict:
    """The variant's tower config with the common grid, the study's normalisation rule and the student path
    filled in."""
    tower = copy.deepcopy(variant.tower)
    args = tower.setdefault("init_args", {})
    if study.grid is not None:
        args["grid"] = study.grid
    args["norm"] = study.norm
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
    from distill.common.timing import StepTimer

    timers = [c for c in cli.trainer.callbacks if isinstance(c, StepTimer)]
    return timers[0].steps_per_second if timers else None


def fit(cfg_path: Path) -> object:
    from mllm.cli import make_cli

    return make_cli(["fit", "-c", str(cfg_path)])
