"""LightningDataModule for distillation: augmented square images in [0, 1], skipped samples dropped.

    dm = DistillDataModule(train=ToyImages(seed=0), val=ToyImages(seed=1000, length=256), image_size=64)

Training batches come from a `ResumableLoader` (distill/data/resumable.py): their position is saved in
every checkpoint and a run resumed with `--ckpt_path` continues with the next batch; each image's
augmentation is drawn from (seed, epoch, index); with W processes each rank takes its share of the
global batch a single process would train on.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from distill.data.augment import eval_transform, train_transform
from distill.data.resumable import (
    ResumableLoader,
    consumed_batches,
    deterministic_stream,
    rng_state,
    run_seed,
    set_rng_state,
    trainer_rank,
)
from distill.data.sources import ImageSource


def collate_images(items: list[torch.Tensor | None]) -> torch.Tensor:
    """Stack the images of a batch, dropping the None entries of skipped samples."""
    images = [x for x in items if x is not None]
    if not images:
        return torch.empty(0)
    return torch.stack(images)


class DistillDataModule(L.LightningDataModule):
    """Training and validation images for distillation.

    Args:
        train: where training images come from (ToyImages, ImageFolder, ShardImages).
        val: held-out images for the per-teacher validation cosine (None disables validation).
        image_size: the square side the student sees; teachers resize it to their own resolution.
        batch_size: images per device per step (the global batch is batch_size x number of processes).
        num_workers: DataLoader worker processes.
        min_scale: smallest area fraction of the random resized crop.
        hflip: random horizontal flips.
        seed: seed of the epoch order and of each image's augmentation; None = the run's
            `seed_everything` value (0 when there is none).
    """

    def __init__(
        self,
        train: ImageSource,
        val: ImageSource | None = None,
        image_size: int = 224,
        batch_size: int = 32,
        num_workers: int = 2,
        min_scale: float = 0.35,
        hflip: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.train_source, self.val_source = train, val
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.min_scale, self.hflip, self.seed = min_scale, hflip, seed

    def train_dataloader(self) -> ResumableLoader:
        dataset = self.train_source.dataset(train_transform(self.image_size, self.min_scale, self.hflip))
        rank, world_size = trainer_rank(self.trainer)
        return ResumableLoader(
            dataset, self.batch_size, seed=run_seed(self.seed), shuffle=True, drop_last=True,
            num_workers=self.num_workers, collate_fn=collate_images, pin_memory=torch.cuda.is_available(),
            rank=rank, world_size=world_size, consumed=consumed_batches(self.trainer),
            replay=deterministic_stream(self.train_source),
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_source is None:
            return []
        return DataLoader(
            self.val_source.dataset(eval_transform(self.image_size)), batch_size=self.batch_size, shuffle=False,
            num_workers=self.num_workers, collate_fn=collate_images, persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: the main process's random generators (the data position is saved by Lightning)."""
        return {"rng": rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "rng" in state:
            set_rng_state(state["rng"])
