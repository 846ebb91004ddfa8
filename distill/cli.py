"""Command line of the distillation trainer.

    python -m distill fit -c configs/distill/toy.yaml            # train (add --ckpt_path X.ckpt to resume)
    python -m distill validate -c configs/distill/toy.yaml --ckpt_path X.ckpt
    python -m distill export --ckpt X.ckpt --out DIR [--with-adaptors]

fit/validate are LightningCLI subcommands: every constructor argument of DistillModule,
DistillDataModule and the Trainer is a config key; each run saves its config.yaml in its log folder.
"""

from __future__ import annotations

import argparse
import sys

from lightning.pytorch.cli import LightningCLI

from distill.data import DistillDataModule
from distill.module import DistillModule


def lightning_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build (and by default run) the LightningCLI of DistillModule + DistillDataModule."""
    return LightningCLI(
        DistillModule,
        DistillDataModule,
        args=args,
        run=run,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"plugins": [{"class_path": "distill.checkpoint_io.AtomicCheckpointIO"}]},
    )


def export_cli(args: list[str]) -> None:
    """`python -m distill export`: write the student for other tools."""
    from distill.export import export_student

    parser = argparse.ArgumentParser(prog="python -m distill export", description=export_student.__doc__)
    parser.add_argument("--ckpt", required=True, help="a checkpoint of `python -m distill fit`")
    parser.add_argument("--out", required=True, help="output folder (timm local-dir format)")
    parser.add_argument("--with-adaptors", action="store_true", help="also write the per-teacher adaptor heads")
    opts = parser.parse_args(args)
    out = export_student(opts.ckpt, opts.out, with_adaptors=opts.with_adaptors)
    print(f"exported student to {out}; load with timm.create_model('local-dir:{out}', pretrained=True)")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "export":
        export_cli(argv[1:])
    else:
        lightning_cli(argv)
