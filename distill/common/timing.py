"""A Lightning callback that measures training throughput (training batches per second; = optimizer
steps per second without gradient accumulation).

    trainer:
      callbacks:
        - class_path: distill.common.timing.StepTimer

The first `skip` steps (warm-up, data-loader start) are not counted. The rate is printed when fit
ends, kept as `timer.steps_per_second`, and written to `<default_root_dir>/steps_per_second.json`.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback

from distill.common.io import save_json


class StepTimer(Callback):
    """Steps per second over the training steps after the first `skip`.

    Args:
        skip: initial steps left out of the measurement.
    """

    def __init__(self, skip: int = 2) -> None:
        self.skip = skip
        self.steps_per_second: float | None = None
        self._start: float | None = None
        self._counted = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._start is None:
            if batch_idx + 1 >= self.skip:
                self._start = now
            return
        self._counted += 1
        self.steps_per_second = self._counted / (now - self._start)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.steps_per_second is None or not trainer.is_global_zero:
            return
        print(f"[timing] {self.steps_per_second:.2f} training steps/s over {self._counted} steps", flush=True)
        save_json({"steps_per_second": self.steps_per_second, "steps": self._counted},
                  Path(trainer.default_root_dir) / "steps_per_second.json")
