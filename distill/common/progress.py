"""Training progress both on a terminal and in a log file, for every `unitower ... fit` (distill and llava).

    StepProgress(every_n_steps=None)   # a Lightning Callback; UnitowerCLI adds it to every trainer

- With `max_steps` set, Lightning leaves `max_epochs` at -1 and its bars read "Epoch 0/-2": once the number of
  batches per epoch is known, `max_epochs` becomes the epochs `max_steps` needs (max_steps still ends the run).
- When stdout is no terminal (output redirected to a file), UnitowerCLI turns the redrawn progress bar off and
  this callback prints one plain line every `every_n_steps` optimizer steps (None: trainer.log_every_n_steps):
  `[fit] step 120/300 (40%) epoch 0 train/loss 0.934 2.7 steps/s eta 0:01:06`.
"""

from __future__ import annotations

import math
import sys
import time

import lightning as L
from lightning.pytorch.callbacks import Callback


class StepProgress(Callback):
    """Sets max_epochs from max_steps and prints progress lines when `print_lines` (stdout no terminal).

    Args:
        every_n_steps: print a line every this many optimizer steps; None = trainer.log_every_n_steps.
        print_lines: print the lines; None = only when stdout is not a terminal.
    """

    def __init__(self, every_n_steps: int | None = None, print_lines: bool | None = None) -> None:
        self.every_n_steps = every_n_steps
        self.print_lines = (not sys.stdout.isatty()) if print_lines is None else print_lines
        self._started = 0.0
        self._start_step = 0
        self._last_printed = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        batches = trainer.num_training_batches
        if trainer.max_steps > 0 and trainer.max_epochs == -1 and math.isfinite(batches) and batches > 0:
            steps_per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
            trainer.fit_loop.max_epochs = math.ceil(trainer.max_steps / steps_per_epoch)
        self._started, self._start_step = time.monotonic(), trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        every = self.every_n_steps or trainer.log_every_n_steps or 1
        if not self.print_lines or step == self._last_printed or not trainer.is_global_zero:
            return
        if step % every and step != trainer.max_steps:
            return
        self._last_printed = step
        print(self.line(trainer), flush=True)

    def line(self, trainer: L.Trainer) -> str:
        """`[fit] step S/MAX (P%) epoch E <logged metrics> R steps/s eta H:MM:SS` for the trainer's state now."""
        step, total = trainer.global_step, trainer.max_steps
        parts = [f"[fit] step {step}" + (f"/{total} ({100 * step // total}%)" if total > 0 else "")]
        parts.append(f"epoch {trainer.current_epoch}")
        for key, value in sorted(trainer.progress_bar_metrics.items()):
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
        elapsed = time.monotonic() - self._started
        done = step - self._start_step
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            parts.append(f"{rate:.3g} steps/s")
            if total > 0:
                remaining = int((total - step) / rate)
                parts.append(f"eta {remaining // 3600}:{remaining // 60 % 60:02d}:{remaining % 60:02d}")
        return " ".join(parts)
