"""Command line of the distillation trainer.

    python -m distill fit -c configs/distill/toy.yaml            # train (add --ckpt_path X.ckpt to resume)
    python -m distill validate -c configs/distill/toy.yaml --ckpt_path X.ckpt
    python -m distill export --ckpt X.ckpt --out DIR [--with-adaptors] [--onnx] [--no-ema] [--student NAME | --all-students]
    python -m distill cache -c configs/distill/toy.yaml --out DIR --images N   # teacher-feature cache

fit/validate are LightningCLI subcommands: every constructor argument of DistillModule,
DistillDataModule and the Trainer is a config key; each run saves its config.yaml in its log folder.

Run folders follow `trainer.default_root_dir` (both CLIs, `UnitowerCLI`): a ModelCheckpoint without
`dirpath` writes there, and without a configured logger the CSV logs go to
`<default_root_dir>/lightning_logs/version_N`. Checkpoints are written atomically
(`AtomicCheckpointIO`), and temp files that killed runs left in the checkpoint folders are removed when
the next fit starts. `trainer.precision: auto` picks bf16-mixed or 32-true for this machine
(distill/common/precision.py: bf16 on CPU only where measured faster) and logs why.

Progress (distill/common/progress.py StepProgress, added to every trainer): with `max_steps` set, max_epochs
becomes the epochs it needs (no "Epoch 0/-2"); when stdout is no terminal the redrawn bar is off and a plain
line is printed every `log_every_n_steps` steps. Warnings that say nothing about the run are filtered where the
CLI starts (QUIET_WARNINGS: LightningCLI's args-and-command-line notice, which `unitower` causes by design, a
Lightning-vs-torch deprecation, and the frozen encoders' eval-mode notice, eval being intended).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Literal, Union

from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from distill.data import DistillDataModule
from distill.common.io import remove_stale_temps
from distill.module import DistillModule
from distill.common.precision import AUTO, resolve_trainer_precision
from distill.common.progress import StepProgress

ATOMIC_CHECKPOINTS = {"plugins": [{"class_path": "distill.common.checkpoint_io.AtomicCheckpointIO"}]}


# (message regex, why it is noise). Matched at the start of the message, as warnings.filterwarnings does.
QUIET_WARNINGS = (
    (r"LightningCLI's args parameter is intended", "unitower hands the arguments after its subcommand as `args`"),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", "Lightning's own call into torch's pytree"),
    (r"Found \d+ module\(s\) in eval mode at the start of training", "frozen encoders stay in eval() by design"),
)


class UnitowerCLI(LightningCLI):
    """LightningCLI whose checkpoint and log folders follow `trainer.default_root_dir` (see module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        for pattern, _ in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        super().__init__(*args, **kwargs)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        return super()._instantiate_trainer(config, [*callbacks, StepProgress()])

    def add_core_arguments_to_parser(self, parser) -> None:
        super().add_core_arguments_to_parser(parser)
        _allow_precision_auto(parser)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.trainer
        trainer.precision = resolve_trainer_precision(trainer.precision, trainer.accelerator)  # "auto": measured
        root = trainer.default_root_dir or os.getcwd()
        if trainer.get("enable_progress_bar") is None and not sys.stdout.isatty():
            trainer.enable_progress_bar = False  # a redrawn bar is noise in a file: StepProgress prints lines
        if trainer.logger is None or trainer.logger is True:
            trainer.logger = Namespace(class_path="lightning.pytorch.loggers.CSVLogger",
                                       init_args=Namespace(save_dir=str(root)))
        for callback in trainer.callbacks or []:
            if _is_model_checkpoint(callback) and callback.init_args.get("dirpath") is None:
                callback.init_args.dirpath = str(root)

    def before_fit(self) -> None:
        folders = {self.trainer.default_root_dir}
        folders |= {cb.dirpath for cb in self.trainer.callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath}
        for folder in folders:
            if folder and "://" not in str(folder):
                remove_stale_temps(folder)


def _allow_precision_auto(parser) -> None:
    """Let `trainer.precision` also take "auto" (resolved per machine by distill.common.precision before the Trainer is built)."""
    action = parser._option_string_actions.get("--trainer.precision")
    if action is None or not hasattr(action, "_typehint"):
        raise RuntimeError("trainer.precision: auto needs jsonargparse's typed --trainer.precision action; "
                           "this lightning/jsonargparse version has none. Set an explicit precision instead.")
    action._typehint = Union[action._typehint, Literal[AUTO]]


def _is_model_checkpoint(callback: Any) -> bool:
    if not isinstance(callback, Namespace) or "class_path" not in callback:
        return False
    try:
        cls = _import(callback.class_path)  # the parser has already resolved short names to full paths
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(cls, type) and issubclass(cls, ModelCheckpoint)


def _import(class_path: str) -> Any:
    import importlib

    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def lightning_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build (and by default run) the LightningCLI of DistillModule + DistillDataModule."""
    return UnitowerCLI(
        DistillModule,
        DistillDataModule,
        args=args,
        run=run,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        trainer_defaults=ATOMIC_CHECKPOINTS,
    )


def export_cli(args: list[str]) -> None:
    """`python -m distill export`: write the student for other tools."""
    from distill.export import export_student

    parser = argparse.ArgumentParser(prog="python -m distill export", description=export_student.__doc__)
    parser.add_argument("--ckpt", required=True, help="a checkpoint of `python -m distill fit`")
    parser.add_argument("--out", required=True, help="output folder (timm local-dir format)")
    parser.add_argument("--with-adaptors", action="store_true", help="also write the per-teacher adaptor heads")
    parser.add_argument("--onnx", action="store_true",
                        help="also write OUT/student.onnx (images [B,3,H,W] in [0,1], dynamic batch and size; with "
                             "--with-adaptors the heads' outputs too); needs pip install 'unitower[onnx]'")
    parser.add_argument("--no-ema", action="store_true",
                        help="write the trained weights even when the run kept an EMA (model.ema_decay); by default "
                             "the EMA is written when the checkpoint has one")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--student", default="student",
                       help="multi-student runs (model.students): the student to write, by name (default: model.student)")
    which.add_argument("--all-students", action="store_true", help="write every student into OUT/<name>/")
    opts = parser.parse_args(args)
    from distill.export import student_names

    names = student_names(opts.ckpt) if opts.all_students else [opts.student]
    for name in names:
        out = Path(opts.out) / name if opts.all_students else Path(opts.out)
        out = export_student(opts.ckpt, out, with_adaptors=opts.with_adaptors, onnx=opts.onnx, ema=not opts.no_ema,
                             student=name)
        print(f"exported {name} ({_weights_of(out)} weights) to {out}; load with "
              f"timm.create_model('local-dir:{out}', pretrained=True)")
        if opts.onnx:
            report_onnx(out, opts.with_adaptors)


def _weights_of(out) -> str:
    import json

    return json.loads((Path(out) / "config.json").read_text())["unitower"].get("weights", "raw")


def report_onnx(out: str, with_adaptors: bool) -> None:
    """Print where the ONNX file is and, with onnxruntime installed, how far it is from PyTorch at two sizes."""
    import importlib.util

    from distill.model import StudentModel
    from distill.onnx_export import ONNX_FILE, check_sizes, compare_onnx

    path = f"{out}/{ONNX_FILE}"
    if importlib.util.find_spec("onnxruntime") is None:
        print(f"wrote {path} (not checked: onnxruntime is not installed)")
        return
    student = StudentModel.from_export(out, adaptors=None if with_adaptors else [])
    diffs = compare_onnx(student, path, check_sizes(student), with_adaptors=with_adaptors)
    figures = ", ".join(f"{diff:.2g} at {size}" for size, diff in diffs.items())
    print(f"wrote {path}; onnxruntime vs PyTorch, max abs diff: {figures}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "export":
        export_cli(argv[1:])
    elif argv and argv[0] == "cache":
        from distill.cache.cli import main as cache_main

        cache_main(argv[1:])
    else:
        lightning_cli(argv)
