"""What every LLaVA data source shares: `EvalItem`, the `DataSource` interface and `RecordDataset`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from PIL import Image
import torch
from torch.utils.data import Dataset

from mllm.data.encode import SampleEncoder

ALIGN_PROMPT = "describe the image briefly."


@dataclass
class EvalItem:
    """One evaluation question: `load_image()` gives the PIL image (None for text-only; cached visual
    tokens [N, C] for a cached-features source); `image_id` groups the questions of one image (paired
    bootstrap over images)."""

    question: str
    answer: str
    kind: str
    options: list[str] | None
    load_image: Callable[[], "Image.Image | torch.Tensor | None"]
    image_id: int | None = None


class RecordDataset(Dataset):
    """Map-style dataset over LLaVA records; `load_image(record)` returns its PIL image or None."""

    def __init__(self, records: list[dict], load_image: Callable[[dict], Image.Image | None], encode: SampleEncoder) -> None:
        self.records = records
        self.load_image = load_image
        self.encode = encode

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict | None:
        record = self.records[index]
        return self.encode(record, self.load_image(record))


class DataSource:
    """Base class of the sources: `dataset(encode)` for training, `eval_items()` for evaluation."""

    def dataset(self, encode: SampleEncoder) -> Dataset:
        raise NotImplementedError

    def eval_items(self, limit: int | None = None) -> list[EvalItem]:
        raise NotImplementedError
