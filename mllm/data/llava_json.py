"""LLaVA's released conversation JSON + image folder as a data source; bad records skipped and counted."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from mllm.conversation import IMAGE_PLACEHOLDER, count_placeholders
from mllm.data.base import DataSource, EvalItem, RecordDataset
from mllm.data.encode import SampleEncoder


def load_llava_json(json_path: str | Path, image_folder: str | Path | None) -> tuple[list[dict], Counter]:
    """Read LLaVA conversation JSON; bad records are skipped and counted (reason -> count), never silently used."""
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
        if reason is None:
            records.append(record)
            continue
        skipped[reason.split(":")[0]] += 1
        examples.append(f"{json_path} record {index}: {reason}")
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
        self.records, self.skipped = load_llava_json(json_path, image_folder)

    def load_image(self, record: dict) -> Image.Image | None:
        return Image.open(Path(self.image_folder or ".") / str(record["image"])) if "image" in record else None

    def dataset(self, encode: SampleEncoder) -> Dataset:
        return RecordDataset(self.records, self.load_image, encode)

    def eval_items(self, limit: int | None = None) -> list[EvalItem]:
        items = []
        for record in self.records[:limit]:
            turns = record["conversations"]
            question = str(turns[0]["value"]).replace(IMAGE_PLACEHOLDER, "").strip()
            answer = str(turns[1]["value"]) if len(turns) > 1 else ""
            items.append(EvalItem(question, answer, str(record.get(self.kind_key, "all")), record.get("options"),
                                  lambda r=record: self.load_image(r)))
        return items
