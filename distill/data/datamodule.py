"""LightningDataModule for distillation: augmented square images in [0, 1]; skipped samples counted and dropped.

    dm = DistillDataModule(train=ToyImages(seed=0), val=ToyImages(seed=1000, length=256), image_size=64)

Training batches come from a `ResumableLoader` (distill/data/resumable.py): their position is saved in
every checkpoint and a run resumed with `--ckpt_path` continues with the next batch; each image's
augmentation is drawn from (seed, epoch, index); with W processes each rank takes its share of the
global batch a single process would train on.
"""

from __future__ import annotations


import torch
from torch.utils.data import DataLoader

from distill.data.augment import eval_transform, train_transform
from distill.data.resumable import (
    CountedResumableData,
    ResumableLoader,
    consumed_batches,
    deterministic_stream,
    run_seed,
    trainer_rank,
)
from distill.data.sources import ImageSource
from distill.common.skips import DataSkips, Skipped


def collate_images(items: list[torch.Tensor | Skipped]) -> dict:
    """{"images": the stacked images (empty if none), "skipped": the Skipped markers of the batch}."""
    images = [x for x in items if not isinstance(x, Skipped)]
    return {"images": torch.stack(images) if images else torch.empty(0),
            "skipped": [x for x in items if isinstance(x, Skipped)]}


class DistillDataModule(CountedResumableData):
    """Training and validation images for distillation.

    Args:
        train: where training images come from (ToyImages, ImageFolder, ShardImages).
        val: held-out images for the per-teacher validation cosine (None disables validation).
        image_size: the square side the student sees; teachers resize it to their own resolution.
        batch_size: images per device per step (the global batch is batch_size x number of processes).
        num_workers: DataLoader worker processes.
        min_scale: smallest area fraction of the random resized crop.
        hflip: random horizontal flips.
        max_skipped_fraction: stop the run (naming the worst files) once more than this fraction of the
            images seen was skipped as broken (checked after 100 images; 1.0 never stops).
        seed: seed of the epoch order and of each image's augmentation; None = the run's
            `seed_everything` value (0 when there is none).
        teacher_cache: a folder written by `python -m distill cache`: training images and the teachers'
            targets then come from it (`train`, `min_scale` and `hflip` are not used for training; each
            image's crop is one of the views stored in the cache) and training batches carry a
            "targets" dict the module uses instead of running the teachers. Validation is unchanged.
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
        seed: int | None = None,
        teacher_cache: str | None = None,
    ) -> None:
        super().__init__()
        self.train_source, self.val_source = train, val
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.skips = DataSkips(max_skipped_fraction)
        self.min_scale, self.hflip, self.seed = min_scale, hflip, seed
        self.teacher_cache = teacher_cache

    def train_dataloader(self) -> ResumableLoader:
        if self.teacher_cache is not None:
            return self._cached_train_dataloader()
        dataset = self.train_source.dataset(train_transform(self.image_size, self.min_scale, self.hflip))
        rank, world_size = trainer_rank(self.trainer)
        return ResumableLoader(
            dataset, self.batch_size, seed=run_seed(self.seed), shuffle=True, drop_last=True,
            num_workers=self.num_workers, collate_fn=collate_images, pin_memory=torch.cuda.is_available(),
            rank=rank, world_size=world_size, consumed=consumed_batches(self.trainer),
            replay=deterministic_stream(self.train_source),
        )

    def _cached_train_dataloader(self) -> ResumableLoader:
        from distill.cache.dataset import CachedViews, collate_cached

        dataset = CachedViews(self.teacher_cache, self.image_size)
        rank, world_size = trainer_rank(self.trainer)
        return ResumableLoader(
            dataset, self.batch_size, seed=run_seed(self.seed), shuffle=True, drop_last=True,
            num_workers=self.num_workers, collate_fn=collate_cached, pin_memory=torch.cuda.is_available(),
            rank=rank, world_size=world_size,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_source is None:
            return []
        return DataLoader(
            self.val_source.dataset(eval_transform(self.image_size)), batch_size=self.batch_size, shuffle=False,
            num_workers=self.num_workers, collate_fn=collate_images, persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> torch.Tensor | dict:
        """Count the batch's skipped samples (main process, exact) and hand the module the images only
        (with a teacher cache: {"images", "targets"})."""
        self.skips.record(self.trainer, batch["skipped"], len(batch["images"]))
        if "targets" in batch:
            return {"images": batch["images"], "targets": batch["targets"]}
        return batch["images"]
