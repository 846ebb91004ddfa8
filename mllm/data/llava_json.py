"""LLaVA's released conversation JSON + image folder as a data source; bad records skipped and counted.

Records that cannot be used (malformed, placeholder mismatch, missing image) are dropped at load and
counted with the training's skip total (`load_skips()`); images are decoded by `distill.common.decode` (one policy
for both packages), and an image that turns out undecodable at training time is skipped and counted too.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from distill.common.decode import decode_image
from distill.common.skips import Skipped
from mllm.conversation import IMAGE_PLACEHOLDER, count_placeholders
from mllm.data.base import DataSource, EvalItem, RecordDataset, UnusableImage
from mllm.data.encode import SampleEncoder


def load_llava_json(json_path: str | Path, image_folder: str | Path | None,
                    dropped: list[Skipped] | None = None,
                    positions: list[tuple[int, bool]] | None = None) -> tuple[list[dict], Counter]:
    """Read LLaVA conversation JSON; bad records are skipped and counted (reason -> count), never silently used.
    A Skipped marker per dropped record is appended to `dropped` when given; `positions` receives (index in the
    file, image missing) for every kept record and every record dropped only because its image file is missing,
    in file order (`LlavaJsonSource.eval_items` scores or reports each of them)."""
    json_path = Path(json_path)
    if not json_path.is_file():
        raise FileNotFoundError(f"LLaVA JSON '{json_path}' does not exist.")
    try:
        data = json.loads(json_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{json_path}: malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}") from None
    if not isinstance(data, list):
        raise ValueError(f"{json_path}: expected a JSON list of records, got {type(data).__name__}.")
    records, skipped, examples = [], Counter(), []
    for index, record in enumerate(data):
        reason = check_record(record, image_folder)
        kind, _, detail = (reason or "").partition(": ")
        if positions is not None and (reason is None or kind == "missing image"):
            positions.append((index, reason is not None))
        if reason is None:
            records.append(record)
            continue
        skipped[kind] += 1
        examples.append(f"{json_path} record {index}: {reason}")
        if dropped is not None:
            record_id = f" (id {record['id']})" if isinstance(record, dict) and "id" in record else ""
            dropped.append(Skipped(f"{json_path} record {index}{record_id}", str(json_path), kind, detail))
    if skipped:
        warnings.warn(f"{json_path}: skipped {sum(skipped.values())} of {len(data)} records {dict(skipped)}; "
                      f"first: {examples[:3]}")
    if not records:
        raise ValueError(f"{json_path}: no usable record among {len(data)}; first problems: {examples[:5]}")
    return records, skipped


def check_record(record: Any, image_folder: str | Path | None) -> str | None:
    """The reason a LLaVA record is unusable ('kind: detail'), or None if it is fine."""
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        return "malformed record: needs a dict with a 'conversations' list"
    placeholders = count_placeholders(record["conversations"])
    if "image" in record:
        if placeholders != 1:
            return f"placeholder mismatch: has an image but {placeholders} '<image>' placeholders"
        path = Path(image_folder or ".") / str(record["image"])
        if not path.is_file():
            return f"missing image: {path}"
    elif placeholders:
        return f"placeholder mismatch: no 'image' but {placeholders} '<image>' placeholder(s)"
    return None


class LlavaJsonSource(DataSource):
    """LLaVA conversation JSON with images under `image_folder`.

    Args:
        json_path: the JSON file (a list of {"id", "image"?, "conversations"}).
        image_folder: folder the records' "image" paths are relative to.
        kind_key: record key holding a question type for evaluation breakdowns (missing -> "all").
    """

    def __init__(self, json_path: str, image_folder: str | None = None, kind_key: str = "question_type") -> None:
        self.json_path, self.image_folder, self.kind_key = json_path, image_folder, kind_key
        self.dropped: list[Skipped] = []
        self.positions: list[tuple[int, bool]] = []  # (index in the file, image missing), see load_llava_json
        self.records, self.skipped = load_llava_json(json_path, image_folder, self.dropped, self.positions)
        self._data: list | None = None  # the whole file, read again only when a record with a missing image is scored

    def load_report(self) -> tuple[int, list[Skipped]]:
        return len(self.records), list(self.dropped)

    def load_image(self, record: dict) -> Image.Image | Skipped | None:
        """The record's RGB image (distill.common.decode policy), None for text-only records, or a Skipped marker."""
        if "image" not in record:
            return None
        path = Path(self.image_folder or ".") / str(record["image"])
        return decode_image(path, f"{self.json_path} record {record.get('id', '?')} image {path}", str(path))

    def dataset(self, encode: SampleEncoder) -> Dataset:
        return RecordDataset(self.records, self.load_image, encode, str(self.json_path))

    def eval_image(self, record: dict, where: str) -> Image.Image | None:
        """The record's image for evaluation; a missing or corrupt one raises UnusableImage naming the record (every
        tower must see the same questions: `python -m mllm evaluate --skip-missing` counts such records out)."""
        image = self.load_image(record)
        if isinstance(image, Skipped):
            raise UnusableImage(f"evaluation record {where}: {image.reason} ({image.detail})")
        return image

    def eval_items(self, limit: int | None = None) -> list[EvalItem]:
        """The first `limit` questions in file order, records with a missing image file included (their
        `load_image` raises UnusableImage); candidate answers come from a record's "candidates" or "options"."""
        kept = iter(self.records)
        items = []
        for index, missing in self.positions[:limit]:
            record = self._record(index) if missing else next(kept)
            turns = record["conversations"]
            question = str(turns[0]["value"]).replace(IMAGE_PLACEHOLDER, "").strip()
            answer = str(turns[1]["value"]) if len(turns) > 1 else ""
            where = (f"{self.json_path} record {index} (id {record.get('id', '?')}) image "
                     f"{Path(self.image_folder or '.') / str(record.get('image', ''))}")
            items.append(EvalItem(question, answer, str(record.get(self.kind_key, "all")),
                                  record.get("candidates", record.get("options")),
                                  lambda r=record, w=where: self.eval_image(r, w), where=where))
        return items

    def _record(self, index: int) -> dict:
        if self._data is None:
            self._data = json.loads(Path(self.json_path).read_text())
        return self._data[index]
