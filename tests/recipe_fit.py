"""Fit a shipped distillation recipe, shrunk to two steps, through the `unitower distill` CLI (tests only)."""

from __future__ import annotations

from pathlib import Path

import yaml


def fit_two_steps(config: dict, tmp_path: Path, **trainer):
    """Run `fit` on `config` (a loaded recipe, changed by the caller) for 2 steps with one validation, batch 4,
    4 validation samples, no progress bar, sanity check or checkpoints (`trainer` adds or overrides trainer keys);
    returns the LightningCLI after checking it took 2 steps."""
    from distill.cli import lightning_cli

    config["trainer"].update(max_steps=2, val_check_interval=2, limit_val_batches=1, default_root_dir=str(tmp_path),
                             enable_progress_bar=False, num_sanity_val_steps=0, enable_checkpointing=False, **trainer)
    config["data"].update(batch_size=4, num_workers=0)
    config["data"]["val"]["init_args"]["length"] = 4
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = lightning_cli(["fit", "-c", str(path)])
    assert cli.trainer.global_step == 2
    return cli
