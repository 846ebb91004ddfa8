"""Lightning CheckpointIO that writes each checkpoint to a temporary file and renames it into place,
so an interrupted save never leaves a truncated .ckpt behind, and reads checkpoints (resume, validate)
with weights_only=True always, as `distill.common.io.load_checkpoint` does (used by both CLIs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pickle

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from distill.common.io import atomic_write, load_checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO with temp-file-and-rename saving (local file systems)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(self, path: str | Path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        try:  # explicit weights_only=True: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot turn unpickling back on
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError:
            load_checkpoint(path, "--ckpt_path")  # raises the project's unsafe / unreadable error
            raise
