"""Training samples from a teacher cache: the student's crop and the teachers' targets for that same crop.

    ds = CachedViews("cache/toy", image_size=64)
    item = ds[i]     # {"image": [3, S, S], "targets": {"clip": {"summary": [C], "dense": [C, h, w]}, ...}}

Map-style (random access through index.json), so `ResumableLoader` resumes it exactly. Each access draws
one of the image's stored views with torch's generator, which the resumable loader seeds from
(seed, epoch, index): the view an image gets depends on the epoch, not on the worker or a resume.
The student's pixels come from `apply_view` on the stored image, the same function the cache writer
used for the teachers, so targets and student crop match exactly (only the compression error remains).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from distill.cache.codec import PcaCodec
from distill.cache.layout import unpack_view
from distill.cache.views import apply_view
from distill.common.decode import decode_image
from distill.common.skips import Skipped


def read_meta(root: str | Path) -> dict:
    root = Path(root)
    meta_path = root / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} does not exist: data.teacher_cache must be a folder written by "
                                "`python -m distill cache` (run it first).")
    return json.loads(meta_path.read_text())


class CachedViews(Dataset):
    """The cache as a map-style dataset (see the module docstring).

    Args:
        root: the cache folder.
        image_size: the student's image size; must equal the size the cache was written for.
        teachers: names of the teachers whose targets to return (None = all cached teachers).
    """

    def __init__(self, root: str | Path, image_size: int, teachers: list[str] | None = None) -> None:
        self.root = Path(root)
        self.meta = read_meta(self.root)
        if self.meta["image_size"] != image_size:
            raise ValueError(f"{self.root}/meta.json: the cache was written for image_size {self.meta['image_size']}, "
                             f"but data.image_size is {image_size}; rebuild the cache or set data.image_size to match.")
        cached = [t["name"] for t in self.meta["teachers"]]
        missing = sorted(set(teachers or []) - set(cached))
        if missing:
            raise ValueError(f"{self.root}: no cached targets for teachers {missing} (cached: {cached}); rebuild the "
                             "cache with the run's teachers.")
        self.wanted = teachers or cached
        self.image_size = image_size
        self.samples = json.loads((self.root / "index.json").read_text())["samples"]
        self.codecs = {name: PcaCodec.load(self.root / f"codec-{name}.safetensors") for name in cached}
        self._files: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, shard: str, offset: int, size: int) -> bytes:
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = open(self.root / shard, "rb")
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise OSError(f"{self.root / shard}: read {len(data)} of {size} bytes at {offset}; the shard is truncated.")
        return data

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_files"] = {}  # open files stay in the process that opened them (DataLoader workers reopen)
        return state

    def __getitem__(self, index: int) -> dict | Skipped:
        rec = self.samples[index]
        where = f"{self.root / rec['shard']} :: {rec['key']}"
        image = decode_image(self._read(rec["shard"], *rec["png"]), f"{where}.png", rec["shard"])
        if isinstance(image, Skipped):
            return image
        view = int(torch.randint(len(rec["views"]), ()).item()) if len(rec["views"]) > 1 else 0
        top, left, height, width, flip = rec["views"][view]
        pixels = apply_view(image, (top, left, height, width, bool(flip)), self.image_size)
        data = self._read(rec["shard"], *rec["tgt"])
        if self.meta.get("compression") == "zlib":  # caches from before compression store the bytes as they are
            data = zlib.decompress(data)
        targets = unpack_view(data, view, self.meta["teachers"], self.codecs)
        return {"image": pixels, "targets": {name: targets[name] for name in self.wanted}}


def collate_cached(items: list[dict | Skipped]) -> dict:
    """{"images": [B, 3, S, S], "targets": {teacher: {"summary": [B, C], "dense": [B, C, h, w]}}, "skipped": [...]}."""
    good = [x for x in items if not isinstance(x, Skipped)]
    batch: dict[str, Any] = {"images": torch.stack([x["image"] for x in good]) if good else torch.empty(0),
                             "skipped": [x for x in items if isinstance(x, Skipped)]}
    if good:
        batch["targets"] = {name: {part: torch.stack([x["targets"][name][part] for x in good]) for part in parts}
                            for name, parts in good[0]["targets"].items()}
    return batch
