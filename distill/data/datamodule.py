"""LightningDataModule for distillation: augmented square images in [0, 1]; skipped samples counted and dropped.

    dm = DistillDataModule(train=ToyImages(seed=0), val=ToyImages(seed=1000, length=256), image_size=64)
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from distill.data.augment import eval_transform, train_transform
from distill.data.sources import ImageSource
from distill.skips import DataSkips, Skipped


def collate_images(items: list[torch.Tensor | Skipped]) -> dict:
    """{"images": the stacked images (empty if none), "skipped": the Skipped markers of the batch}."""
    images = [x for x in items if not isinstance(x, Skipped)]
    return {"images": torch.stack(images) if images else torch.empty(0),
            "skipped": [x for x in items if isinstance(x, Skipped)]}


class DistillDataModule(L.LightningDataModule):
    """Training and validation images for distillation.

    Args:
        train: where training images come from (ToyImages, ImageFolder, ShardImages).
        val: held-out images for the per-teacher validation cosine (None disables validation).
        image_size: the square side the student sees; teachers resize it to their own resolution.
        batch_size: images per device per step.
        num_workers: DataLoader worker processes.
        min_scale: smallest area fraction of the random resized crop.
        hflip: random horizontal flips.
        max_skipped_fraction: stop the run (naming the worst files) once more than this fraction of the
            images seen was skipped as broken (checked after 100 images; 1.0 never stops).
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
        max_skipped_fraction: float = 0.5,
    ) -> None:
        super().__init__()
        self.train_source, self.val_source = train, val
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.min_scale, self.hflip = min_scale, hflip
        self.skips = DataSkips(max_skipped_fraction)

    def _loader(self, dataset, shuffle: bool) -> DataLoader:
        iterable = isinstance(dataset, IterableDataset)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle and not iterable,
            num_workers=self.num_workers,
            collate_fn=collate_images,
            drop_last=shuffle,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        dataset = self.train_source.dataset(train_transform(self.image_size, self.min_scale, self.hflip))
        return self._loader(dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_source is None:
            return []
        return self._loader(self.val_source.dataset(eval_transform(self.image_size)), shuffle=False)

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> torch.Tensor:
        """Count the batch's skipped samples (main process, exact) and hand the module the images only."""
        self.skips.record(self.trainer, batch["skipped"], len(batch["images"]))
        return batch["images"]

    def teardown(self, stage: str) -> None:
        if stage == "fit" and (self.trainer is None or self.trainer.is_global_zero):
            print(self.skips.summary(), flush=True)
