"""Data sources for the LLaVA stages: LLaVA conversation JSON + image folder, webdataset shards, the toy world.

Every source yields LLaVA records (`{"id", "image"?, "conversations": [...]}`) and their images; a
`SampleEncoder` turns a record into training tensors (token ids, labels, image [3, S, S]) and returns
None for a bad record, which `collate` drops and counts. Sources (chosen in YAML with class_path):

    ToySource(seed=0, num_images=2000, stage="align")        the toy world (default)
    LlavaJsonSource("llava_v1_5_mix665k.json", "images/")      LLaVA's released format
    WebDataSource("shards/{000000..000099}.tar")               tar shards with jpg|png + json members

Each source also gives `eval_items()`: single questions with reference answers and kinds for evaluation.
"""

from __future__ import annotations

import json
import random
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset
from torchvision.transforms.functional import to_tensor

from mllm.conversation import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    ConversationError,
    count_placeholders,
    tokenize_conversation,
)

ALIGN_PROMPT = "describe the image briefly."


@dataclass
class EvalItem:
    """One evaluation question: `load_image()` gives the PIL image (None for text-only)."""

    question: str
    answer: str
    kind: str
    options: list[str] | None
    load_image: Callable[[], Image.Image | None]


def image_to_tensor(image: Image.Image, image_size: int, pad_to_square: bool = False) -> torch.Tensor:
    """RGB [3, image_size, image_size] in [0, 1]; pad_to_square pads with the mean color first (LLaVA-1.5 'pad')."""
    image = image.convert("RGB")
    if pad_to_square and image.width != image.height:
        side = max(image.size)
        mean = tuple(int(v) for v in np.asarray(image).reshape(-1, 3).mean(0))
        canvas = Image.new("RGB", (side, side), mean)
        canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = canvas
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BICUBIC)
    return to_tensor(image)


class SampleEncoder:
    """Record + image -> {"input_ids", "labels", "image"} tensors, or None for a bad record (counted in `skipped`).

    Args:
        tokenizer: the LM's tokenizer.
        num_image_tokens: tokens per image of the vision tower.
        max_length: max tokens per sample (image tokens never cut).
        image_size: side the images are resized to before the tower's own preprocessing.
        chat_template: template name/string; None = the tokenizer's own.
        system_prompt: optional system message.
        pad_to_square: pad images to square before resizing.
    """

    def __init__(self, tokenizer: Any, num_image_tokens: int, max_length: int, image_size: int,
                 chat_template: str | None = None, system_prompt: str | None = None, pad_to_square: bool = False) -> None:
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.image_size = image_size
        self.chat_template = chat_template
        self.system_prompt = system_prompt
        self.pad_to_square = pad_to_square
        self.skipped: Counter = Counter()

    def __call__(self, record: dict, image: Image.Image | None) -> dict | None:
        try:
            input_ids, labels = tokenize_conversation(
                record["conversations"], self.tokenizer, self.num_image_tokens, self.max_length,
                num_images=0 if image is None else 1, chat_template=self.chat_template,
                system_prompt=self.system_prompt,
            )
        except ConversationError as error:
            self.skipped[type(error).__name__] += 1
            if sum(self.skipped.values()) <= 5:
                warnings.warn(f"skipping record {record.get('id', '?')}: {error}")
            return None
        return {
            "input_ids": torch.tensor(input_ids),
            "labels": torch.tensor(labels),
            "image": None if image is None else image_to_tensor(image, self.image_size, self.pad_to_square),
        }


def collate(samples: list[dict | None], pad_token_id: int, padding_side: str = "right") -> dict:
    """Pad a batch; drops None samples (bad records) and reports their number as `num_skipped`."""
    kept = [s for s in samples if s is not None]
    if not kept:
        raise ValueError("every sample of this batch was a bad record; see the warnings above for the reasons.")
    length = max(len(s["input_ids"]) for s in kept)
    input_ids = torch.full((len(kept), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(kept), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(kept), length), dtype=torch.long)
    for row, sample in enumerate(kept):
        n = len(sample["input_ids"])
        span = slice(0, n) if padding_side == "right" else slice(length - n, length)
        input_ids[row, span] = sample["input_ids"]
        labels[row, span] = sample["labels"]
        attention_mask[row, span] = 1
    images = [s["image"] for s in kept if s["image"] is not None]
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "images": torch.stack(images) if images else None,
        "num_skipped": len(samples) - len(kept),
    }


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


# ---------------------------------------------------------------- the toy world
class ToySource(DataSource):
    """The toy world as LLaVA records: align = one caption per image; finetune = its QA as a chat.

    Args:
        seed: world seed (0 = train, 1000 = held-out).
        num_images: number of images (indices 0 .. num_images-1).
        stage: "align" (caption records) or "finetune" (question/answer records).
        image_size: side of the generated images.
        questions_per_record: finetune turns per record, drawn at random (deterministic per image) from
            the image's QA; None = all of them. Toy questions name attributes that other questions ask
            for ("what shape is the yellow object?" answers "what color is the square?"), so with several
            turns the LM can copy answers from the chat instead of looking; 1 forces it to look.
    """

    def __init__(self, seed: int = 0, num_images: int = 2000, stage: Literal["align", "finetune"] = "align",
                 image_size: int = 64, questions_per_record: int | None = None) -> None:
        from distill.toy.world import ToyWorld  # lazy: only toy sources need the generator

        if stage not in ("align", "finetune"):
            raise ValueError(f"ToySource stage='{stage}' is unknown; use 'align' or 'finetune'.")
        if questions_per_record is not None and questions_per_record < 1:
            raise ValueError(f"ToySource questions_per_record={questions_per_record}; use a number >= 1 or None (all).")
        self.questions_per_record = questions_per_record
        self.world = ToyWorld(seed=seed, image_size=image_size)
        self.seed, self.num_images, self.stage = seed, num_images, stage

    def record(self, index: int) -> dict:
        return self.record_and_image(index)[0]

    def record_and_image(self, index: int) -> tuple[dict, Image.Image]:
        """The LLaVA record of image `index` and the image itself (the sample is generated once)."""
        sample = self.world[index]
        if self.stage == "align":
            turns = [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{ALIGN_PROMPT}"},
                     {"from": "gpt", "value": sample.caption}]
        else:
            # Shuffled per image: evaluation asks single questions, so no kind may always come first.
            qas = list(sample.qa)
            random.Random(f"{self.seed}-{index}").shuffle(qas)
            qas = qas[: self.questions_per_record]
            turns = []
            for position, qa in enumerate(qas):
                prefix = f"{IMAGE_PLACEHOLDER}\n" if position == 0 else ""
                turns += [{"from": "human", "value": prefix + qa.question}, {"from": "gpt", "value": qa.answer}]
        return {"id": f"toy{self.seed}-{index}", "image": index, "conversations": turns}, sample.image

    def dataset(self, encode: SampleEncoder) -> Dataset:
        records = [{"id": f"toy{self.seed}-{i}", "image": i} for i in range(self.num_images)]
        return RecordDataset(records, lambda r: None, _ToyEncode(self, encode))

    def eval_items(self, limit: int | None = None) -> list[EvalItem]:
        items = []
        for index in range(self.num_images):
            sample = self.world[index]  # generated once; its questions share the image
            load = (lambda image=sample.image: image)
            if self.stage == "align":
                items.append(EvalItem(ALIGN_PROMPT, sample.caption, "caption", None, load))
            else:
                items += [EvalItem(q.question, q.answer, q.kind, q.options, load) for q in sample.qa]
        return items[:limit]


class _ToyEncode:
    """Generates the toy sample inside the worker (the record holds only its index)."""

    def __init__(self, source: ToySource, encode: SampleEncoder) -> None:
        self.source, self.encode = source, encode

    def __call__(self, record: dict, image: Image.Image | None) -> dict | None:
        return self.encode(*self.source.record_and_image(record["image"]))


# ---------------------------------------------------------------- LLaVA JSON
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


# ---------------------------------------------------------------- webdataset shards
class WebDataSource(DataSource):
    """webdataset tar shards; each sample has a `json` member (a LLaVA record) and optionally `jpg`/`png`.

    Args:
        urls: shard spec, e.g. "data/{000000..000009}.tar".
        shuffle_buffer: samples in the shuffle buffer (0 = no shuffling).
    """

    def __init__(self, urls: str, shuffle_buffer: int = 1000) -> None:
        self.urls, self.shuffle_buffer = urls, shuffle_buffer

    def samples(self, shuffle: bool = True) -> Iterator[tuple[dict, Image.Image | None]]:
        import webdataset as wds  # lazy: only shard sources need it

        pipeline = wds.WebDataset(self.urls, shardshuffle=False, nodesplitter=wds.split_by_node, empty_check=False)
        if shuffle and self.shuffle_buffer:
            pipeline = pipeline.shuffle(self.shuffle_buffer)
        for sample in pipeline.decode("pil"):
            record = sample.get("json")
            if record is None:
                raise ValueError(f"{sample.get('__url__')}: sample '{sample.get('__key__')}' has no .json member.")
            yield record, sample.get("jpg", sample.get("png"))

    def dataset(self, encode: SampleEncoder) -> IterableDataset:
        return _WebDataset(self, encode)

    def eval_items(self, limit: int | None = None) -> list[EvalItem]:
        items = []
        for record, image in self.samples(shuffle=False):
            turns = record["conversations"]
            items.append(EvalItem(str(turns[0]["value"]).replace(IMAGE_PLACEHOLDER, "").strip(), str(turns[1]["value"]),
                                  str(record.get("question_type", "all")), record.get("options"), lambda im=image: im))
            if limit is not None and len(items) >= limit:
                break
        return items


class _WebDataset(IterableDataset):
    def __init__(self, source: WebDataSource, encode: SampleEncoder) -> None:
        self.source, self.encode = source, encode

    def __iter__(self):
        for record, image in self.source.samples():
            sample = self.encode(record, image)
            if sample is not None:
                yield sample
