"""What every LLaVA data source shares: `EvalItem`, the `DataSource` interface and `RecordDataset`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from PIL import Image
import torch
from torch.utils.data import Dataset

from distill.common.skips import Skipped
from mllm.data.encode import SampleEncoder

ALIGN_PROMPT = "describe the image briefly."


@dataclass
class EvalItem:
    """One evaluation question: `load_image()` gives the PIL image (None for text-only; cached visual
    tokens [N, C] for a cached-features source; raises UnusableImage for a missing or corrupt image file);
    `image_id` groups the questions of one image (paired bootstrap over images); `where` names the record."""

    question: str
    answer: str
    kind: str
    options: list[str] | None
    load_image: Callable[[], "Image.Image | torch.Tensor | None"]
    image_id: int | None = None
    where: str = ""  # names the record in errors and reports: file, index, id, image path


class UnusableImage(ValueError):
    """An evaluation record's image is missing or cannot be decoded; the message names the record (file, index,
    id, path). `python -m mllm evaluate` stops on it unless --skip-missing counts such records out."""


def encode_or_skip(encode: Callable[[dict, Image.Image | None], dict | None], record: dict,
                   image: Image.Image | Skipped | None, where: str, file: str) -> dict | Skipped:
    """`encode(record, image)`, or a Skipped marker for an unusable image or a record the encoder rejects."""
    if isinstance(image, Skipped):
        return image
    sample = encode(record, image)
    if sample is None:
        return Skipped(where, file or where, "bad conversation", "rejected by the tokenizer step (see its warning)")
    return sample


class RecordDataset(Dataset):
    """Map-style dataset over LLaVA records; `load_image(record)` returns its PIL image, None (text-only) or
    a Skipped marker; items are encoded samples or Skipped markers (counted by the DataModule)."""

    def __init__(self, records: list[dict], load_image: Callable[[dict], Image.Image | Skipped | None],
                 encode: SampleEncoder, file: str = "") -> None:
        self.records = records
        self.load_image = load_image
        self.encode = encode
        self.file = file

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict | Skipped:
        record = self.records[index]
        where = f"{self.file} record {record.get('id', index)}".strip()
        return encode_or_skip(self.encode, record, self.load_image(record), where, self.file)


class DataSource:
    """Base class of the sources: `dataset(encode)` for training, `eval_items()` for evaluation, and
    `load_report()`: (records kept, Skipped markers of records dropped at load, e.g. bad JSON records)."""

    def load_report(self) -> tuple[int, list[Skipped]]:
        return 0, []

    def dataset(self, encode: SampleEncoder) -> Dataset:
        raise NotImplementedError

    def eval_items(self, limit: int | None = None) -> list[EvalItem]:
        raise NotImplementedError
