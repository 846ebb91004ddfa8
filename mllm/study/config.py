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
class ProbeControls:
    """Probe-only rows (no LLaVA runs) that say which of a tower's knowledge was *learned*: the same probes
    on the tower with its weights re-initialised and on raw pixels (mllm/study/instrument.py).

    Args:
        untrained: single variants probed again with every weight re-initialised (seeded, same config and
            shapes: mllm/study/reinit.py); each gives the row ``untrained_<name>``.
        pixels: probe the raw pixels: each grid cell's every 4th value (of its flattened H*W*3 values, in
            [0, 1]) is its token; gives the row ``pixels``.
        seed: seed of the re-initialisation.
    """

    untrained: list[str] = field(default_factory=list)
    pixels: bool = False
    seed: int = 0


@dataclass
class Gates:
    """Thresholds of the learned-skill and reader gates (mllm/study/gates.py) and of the claims' weak links.

    Args:
        skill_over_untrained: an owner's probe on its kind must beat its untrained tower's probe by this much.
        skill_over_pixels: ... and the raw-pixel probe by this much.
        skill_over_others: ... and every other single tower's probe by this much.
        reader_min_ratio: LLaVA accuracy / probe accuracy every single, ensemble and student variant must reach
            on every asked kind (the LLaVA reads what the tower knows).
        fidelity_slack: a student's probe more than this below the owner teacher's probe on an owned kind names
            student fidelity as a weak link of a failing claim.
    """

    skill_over_untrained: float = 0.20
    skill_over_pixels: float = 0.20
    skill_over_others: float = 0.15
    reader_min_ratio: float = 0.9
    fidelity_slack: float = 0.02


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
        norm: the one normalisation rule every tower applies to its encoders' features, live and cached
            (mllm/towers.py): "standardize" (per-channel mean/std measured once on the first training records),
            "whiten" (standardize + ZCA whitening), "layernorm" (per token, no affine) or "none".
        image_size: image side given to the towers and used for cost measurements.
        max_objects: objects per toy image at most (1..4, one per quadrant); 1 = one object per image.
        eval_json: LLaVA-format JSON of evaluation questions (with ``question_type`` per record); None =
            the toy world's held-out questions.
        eval_image_folder: folder of the images named in ``eval_json``.
        variants: the towers to compare.
        owners: {question kind: single variant} whose teacher family learned the skill the kind needs (e.g.
            ``{color: clip, texture: dino, size: sam}``); feeds claim (b) and the learned-skill gate. Kinds are
            the world's (distill/toy/world.py QA_KINDS) or, with ``eval_json``, the questions' types.
        fusion_kinds: question kinds that need several skills at once, on which every ensemble is claimed
            ahead of every single tower (claim (c)), e.g. ``[fusion]``.
        probe_controls: probe-only rows of untrained towers and raw pixels (toy study only).
        gates: thresholds of the learned-skill and reader gates.
        full: the budget of the real study.
        smoke: the budget of ``--smoke`` (1 seed, few steps).
    """

    align_recipe: str
    finetune_recipe: str
    distill_recipe: str
    variants: list[Variant]
    student: str | None = None
    grid: int | None = 8
    norm: str = "standardize"
    image_size: int = 64
    max_objects: int = 4
    eval_json: str | None = None
    eval_image_folder: str | None = None
    owners: dict[str, str] = field(default_factory=dict)
    fusion_kinds: list[str] = field(default_factory=list)
    probe_controls: ProbeControls = field(default_factory=ProbeControls)
    gates: Gates = field(default_factory=Gates)
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
    _check_skills(study, Path(path))
    return study


def _check_skills(study: Study, study_file: Path) -> None:
    """`owners` and `probe_controls.untrained` name single variants; toy kinds are the world's."""
    singles = [v.name for v in study.variants if v.kind == "single"]
    for kind, owner in study.owners.items():
        if owner not in singles:
            raise ValueError(f"{study_file}: owners.{kind} is {owner!r}, which is not a single variant of this study; "
                             f"name one of {singles}.")
    for name in study.probe_controls.untrained:
        if name not in singles:
            raise ValueError(f"{study_file}: probe_controls.untrained names {name!r}, which is not a single variant; "
                             f"name some of {singles}.")
    if study.eval_json:
        if study.probe_controls.untrained or study.probe_controls.pixels:
            raise ValueError(f"{study_file}: probe_controls need the toy world's object labels; remove them from a "
                             "study with eval_json.")
        return
    from distill.toy.world import QA_KINDS

    for key, kinds in (("owners", list(study.owners)), ("fusion_kinds", study.fusion_kinds)):
        unknown = [k for k in kinds if k not in QA_KINDS]
        if unknown:
            raise ValueError(f"{study_file}: {key} names question kind(s) {unknown} that the toy world does not ask; "
                             f"its kinds are {list(QA_KINDS)} (distill/toy/world.py QA_KINDS).")


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
