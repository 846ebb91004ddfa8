"""Lightning CheckpointIO that writes each checkpoint to a temporary file and renames it into place,
so an interrupted save never leaves a truncated .ckpt behind (used by both CLIs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from distill.io import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO with temp-file-and-rename saving (local file systems)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))
