"""The study's settings: which variants, which recipes, how many steps and seeds. Read from YAML
(configs/study/*.yaml) and type-checked by jsonargparse.

    study = load_study("configs/study/toy.yaml", smoke=False)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from jsonargparse import ArgumentError, ArgumentParser

from mllm.recipes import read_tower, resolve_config

STUDENT_PLACEHOLDER = "{student}"
KINDS = ("single", "ensemble", "student", "control")
CONTROLS = ("blind", "oracle")


@dataclass
class Variant:
    """One vision tower to compare.

    Args:
        name: row name in the table (e.g. ``clip``, ``ensemble_all``, ``student``).
        kind: ``single``, ``ensemble``, ``student`` or ``control`` (no tower: see ``control``).
        tower: the tower: a tower YAML file (configs/towers/*.yaml; a relative path is relative to the study
            file, as jsonargparse reads paths inside a config) or an inline class_path/init_args dict; in a
            student tower the path ``{student}`` is replaced by the distilled student's export folder. Empty
            for controls.
        control: for kind ``control``: ``blind`` (constant tokens: no image information) or ``oracle``
            (tokens built from the toy generator's ground truth: perfect perception).
        distill_overlay: for kind ``student``: a distill overlay YAML (configs/distill/overlays/*.yaml; relative
            to the study file) put on top of ``distill_recipe`` for this variant's students, as
            ``-c RECIPE -c OVERLAY`` would (e.g. a smaller student). None: the recipe as it is.
    """

    name: str
    kind: str
    tower: dict | str = field(default_factory=dict)
    control: str | None = None
    distill_overlay: str | None = None


@dataclass
class Budget:
    """Steps and sizes of one study mode.

    Args:
        seeds: seeds per variant.
        align_steps: optimizer steps of the align stage.
        finetune_steps: optimizer steps of the finetune stage.
        distill_steps: optimizer steps of each seed's distillation (when no student is given).
        eval_images: held-out images whose questions (every kind for every object) are scored.
        toy_profile: toy-world build profile ("default" or "smoke": teachers trained for a few steps).
        train_images: training-world images whose tower tokens are cached and trained on.
        records_per_image: finetune records per training image (each asks its objects anew).
        probe_images: training images whose objects fit the linear probes (and the text prior).
        workers: LLaVA runs trained at once, each in its own process with one torch thread.
    """

    seeds: int = 3
    align_steps: int = 300
    finetune_steps: int = 600
    distill_steps: int = 600
    eval_images: int = 1000
    toy_profile: str = "default"
    train_images: int = 8000
    records_per_image: int = 8
    probe_images: int = 4000
    workers: int = 2


@dataclass
class Study:
    """A whole comparison study.

    Args:
        align_recipe: configs/mllm YAML of the align stage (its tower is replaced per variant). The three recipe
            paths are read relative to the cwd first, then as shipped recipes (mllm/recipes.py `resolve_config`).
        finetune_recipe: configs/mllm YAML of the finetune stage.
        distill_recipe: configs/distill YAML used to distill the student when ``student`` is None.
        student: an existing ``python -m distill export`` folder (skips distillation).
        grid: visual tokens per side for every tower (the same token budget for all); None keeps each tower's own.
        image_size: image side given to the towers and used for cost measurements.
        max_objects: objects per toy image at most (1..4, one per quadrant); 1 = one object per image.
        eval_json: LLaVA-format JSON of evaluation questions (with ``question_type`` per record); None =
            the toy world's held-out questions.
        eval_image_folder: folder of the images named in ``eval_json``.
        variants: the towers to compare.
        full: the budget of the real study.
        smoke: the budget of ``--smoke`` (1 seed, few steps).
    """

    align_recipe: str
    finetune_recipe: str
    distill_recipe: str
    variants: list[Variant]
    student: str | None = None
    grid: int | None = 8
    image_size: int = 64
    max_objects: int = 4
    eval_json: str | None = None
    eval_image_folder: str | None = None
    full: Budget = field(default_factory=Budget)
    smoke: Budget = field(default_factory=lambda: Budget(1, 20, 30, 30, 40, "smoke", 200, 2, 200))


def study_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="compare_baselines study config", exit_on_error=False)
    parser.add_class_arguments(Study)
    return parser


def load_study(path: str | Path) -> Study:
    """Parse and validate a study YAML (unknown keys and wrong types are errors naming the key)."""
    parser = study_parser()
    if not Path(path).is_file():
        raise FileNotFoundError(f"study config {path} does not exist; see configs/study/ for examples.")
    try:
        cfg = parser.instantiate_classes(parser.parse_path(path))
    except ArgumentError as error:  # jsonargparse names the key but not the file
        raise ValueError(f"study config {path}: {' '.join(str(error).split())}; the keys and their types are "
                         "Study and Budget in mllm/study/config.py.") from error
    study = Study(**{k: v for k, v in vars(cfg).items() if not k.startswith("__")})
    for key in ("align_recipe", "finetune_recipe", "distill_recipe"):  # the cwd first, then the shipped recipes
        setattr(study, key, str(resolve_config(getattr(study, key), f"{path}: {key}")))
    for variant in study.variants:  # nested tower configs may come back as jsonargparse Namespaces
        variant.tower = _plain(read_tower(variant.tower, Path(path).parent, f"{path}: variant {variant.name!r}"))
    names = [v.name for v in study.variants]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: variant names must be unique, got {names}")
    for v in study.variants:
        if v.kind not in KINDS:
            raise ValueError(f"{path}: variant {v.name!r} has kind {v.kind!r}; use one of {KINDS}")
        if v.kind == "control":
            if v.control not in CONTROLS:
                raise ValueError(f"{path}: control variant {v.name!r} needs `control` set to one of {CONTROLS}")
        elif "class_path" not in v.tower:
            raise ValueError(f"{path}: variant {v.name!r} tower needs a class_path (e.g. mllm.towers.SingleEncoderTower)")
        if v.distill_overlay is not None:
            v.distill_overlay = _overlay_path(v, Path(path))
    return study


def _overlay_path(variant: Variant, study_file: Path) -> str:
    """The variant's distill overlay as a path that exists (relative names resolve against the study file)."""
    if variant.kind != "student":
        raise ValueError(f"{study_file}: variant {variant.name!r} has a distill_overlay but kind {variant.kind!r}; "
                         "only student variants are distilled.")
    overlay = study_file.parent / variant.distill_overlay
    if not overlay.is_file():
        raise FileNotFoundError(f"{study_file}: variant {variant.name!r} distill_overlay '{variant.distill_overlay}' "
                                f"(resolved to {overlay}) does not exist; name a configs/distill/overlays/*.yaml file "
                                "relative to the study file.")
    return str(overlay)


def _plain(value):
    """Namespaces (and the dicts / lists holding them) as plain dicts and lists."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def with_budget(study: Study, smoke: bool, seeds: int | None = None) -> Budget:
    """The budget in force: smoke or full, with an optional seed override."""
    budget = study.smoke if smoke else study.full
    return replace(budget, seeds=seeds) if seeds else budget
