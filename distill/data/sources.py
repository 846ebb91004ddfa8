"""Where distillation images come from. Each source builds a torch Dataset of [3, S, S] tensors.

- ToyImages: the procedural toy world (distill.toy.world), deterministic from a seed.
- ImageFolder: every image file below a folder (recursively).
- ShardImages: webdataset tar shards (local paths, brace patterns or URLs), split across nodes and
  DataLoader workers.

Every image and shard is read through `distill.common.decode` (one policy for both packages). An item that
cannot be used (undecodable, truncated, too small, missing member, damaged or missing shard) is returned
as a `distill.common.skips.Skipped` marker naming the file or shard member; the DataModule counts the markers of
each batch in the main process (exact with any number of workers), warns, and stops a run that skips more
than `max_skipped_fraction`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset

from distill.common.decode import decode_image, tar_samples_stage
from distill.common.skips import Skipped

Transform = Callable[[Image.Image], torch.Tensor]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def load_image(data: bytes | str | Path, where: str, min_size: int, file: str | None = None) -> Image.Image | Skipped:
    """Decode an RGB image (distill.common.decode policy), or a Skipped marker when it is unusable or too small."""
    image = decode_image(data, where, file)
    if isinstance(image, Image.Image) and min(image.size) < min_size:
        return Skipped(where, str(file or where), "too small",
                       f"image {image.size[0]}x{image.size[1]} is smaller than min_size={min_size}")
    return image


class ImageSource:
    """Base class: `dataset(transform)` returns a Dataset whose items are transformed images or Skipped markers."""

    def dataset(self, transform: Transform) -> Dataset:
        raise NotImplementedError


class ToyImages(ImageSource):
    """Images of the toy world.

    Args:
        seed: world seed (0 = training world; held-out images use another seed, e.g. 1000).
        image_size: side of the generated images in pixels.
        length: number of images in one epoch.
    """

    def __init__(self, seed: int = 0, image_size: int = 64, length: int = 10_000) -> None:
        self.seed, self.image_size, self.length = seed, image_size, length

    def dataset(self, transform: Transform) -> Dataset:
        from distill.toy.world import ToyWorld

        return _MappedImages(ToyWorld(seed=self.seed, image_size=self.image_size), self.length, transform)


class _MappedImages(Dataset):
    def __init__(self, world, length: int, transform: Transform) -> None:
        self.world, self.length, self.transform = world, length, transform

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(self.world[index].image)


class ImageFolder(ImageSource):
    """All image files below a folder.

    Args:
        root: the folder (searched recursively for .jpg/.jpeg/.png/.webp/.bmp).
        min_size: images whose shorter side is below this are skipped and counted.
    """

    def __init__(self, root: str, min_size: int = 16) -> None:
        self.root, self.min_size = root, min_size

    def dataset(self, transform: Transform) -> Dataset:
        root = Path(self.root)
        if not root.is_dir():
            raise FileNotFoundError(f"Image folder {root} does not exist; set data.train.init_args.root to a folder of images.")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise FileNotFoundError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) found below {root}.")
        return _FolderDataset(files, transform, self.min_size)


class _FolderDataset(Dataset):
    def __init__(self, files: list[Path], transform: Transform, min_size: int) -> None:
        self.files, self.transform, self.min_size = files, transform, min_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor | Skipped:
        image = load_image(self.files[index], str(self.files[index]), self.min_size)
        return image if isinstance(image, Skipped) else self.transform(image)


class ShardImages(ImageSource):
    """Images from webdataset tar shards (`000000.tar` ... with `jpg`/`png` members).

    Args:
        urls: a shard path, brace pattern (``/data/shards/{000000..000099}.tar``), URL, or a list of them.
        resampled: sample shards with replacement forever (training); False reads each shard once,
            split across nodes and workers (validation).
        shuffle_buffer: samples held in the shuffle buffer (0 disables shuffling).
        min_size: images whose shorter side is below this are skipped and counted.
        image_keys: member extensions tried in order for the image.
    """

    def __init__(
        self,
        urls: str | list[str],
        resampled: bool = True,
        shuffle_buffer: int = 1000,
        min_size: int = 16,
        image_keys: tuple[str, ...] = ("jpg", "jpeg", "png", "webp"),
    ) -> None:
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        self.resampled, self.shuffle_buffer, self.min_size, self.image_keys = resampled, shuffle_buffer, min_size, image_keys

    def expanded_urls(self) -> list[str]:
        """Brace-expand every pattern; warn about missing local shards (each is skipped and counted when the
        stream reaches it) and raise if none exists."""
        import braceexpand

        urls = [u for pattern in self.urls for u in braceexpand.braceexpand(pattern)]
        missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not os.path.exists(u)]
        if missing and len(missing) == len(urls):
            raise FileNotFoundError(f"None of the {len(urls)} shards exists, e.g. {missing[:3]}; check data urls in the config.")
        if missing:
            warnings.warn(f"{len(missing)} of {len(urls)} shards do not exist, e.g. {missing[:3]}; they are skipped "
                          "and counted. Check data urls in the config.")
        return urls

    def dataset(self, transform: Transform) -> IterableDataset:
        import webdataset as wds

        urls = self.expanded_urls()
        image_keys, min_size = self.image_keys, self.min_size

        def decode(sample: dict | Skipped) -> torch.Tensor | Skipped:
            if isinstance(sample, Skipped):
                return sample
            where, shard = f"{sample['__url__']} :: {sample['__key__']}", sample["__url__"]
            key = next((k for k in image_keys if k in sample), None)
            if key is None:
                members = sorted(k for k in sample if not k.startswith("__"))
                return Skipped(where, shard, "no image member", f"members {members}, expected one of {list(image_keys)}")
            image = load_image(sample[key], f"{where}.{key}", min_size, shard)
            return image if isinstance(image, Skipped) else transform(image)

        if self.resampled:
            stages = [wds.ResampledShards(urls)]
        else:
            stages = [wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker]
        stages.append(tar_samples_stage)
        if self.shuffle_buffer:
            stages.append(wds.shuffle(self.shuffle_buffer))
        stages.append(wds.map(decode))
        return wds.DataPipeline(*stages)
