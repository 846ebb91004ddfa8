"""webdataset tar shards (a `json` LLaVA record + `jpg`/`png` per sample) as a data source.

Shards are read and images decoded by `distill.common.decode` (one policy for both packages): a sample whose
json or image member is missing or unusable, a damaged or truncated shard and a missing shard become
Skipped markers naming shard and member, counted by the DataModule. The shards `python -m distill.toy export`
writes (json = caption + question/answer pairs, no "conversations") are read as the same conversations as
its llava.json: a caption turn followed by every question.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator

from PIL import Image
from torch.utils.data import IterableDataset

from distill.common.decode import decode_image, tar_samples_stage
from distill.common.skips import Skipped
from mllm.conversation import IMAGE_PLACEHOLDER
from mllm.data.base import DataSource, EvalItem, encode_or_skip
from mllm.data.encode import SampleEncoder

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def sample_record(sample: dict) -> tuple[dict, Image.Image | None, str] | Skipped:
    """(LLaVA record, RGB image or None, 'shard :: key') of one shard sample, or a Skipped marker naming
    shard and member."""
    shard, key = sample["__url__"], sample["__key__"]
    where = f"{shard} :: {key}"
    members = sorted(k for k in sample if not k.startswith("__"))
    if "json" not in sample:
        return Skipped(where, shard, "no json member", f"members {members}")
    try:
        record = json.loads(sample["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return Skipped(f"{where}.json", shard, "bad json member", str(error))
    if not isinstance(record, dict):
        return Skipped(f"{where}.json", shard, "bad json member", f"a JSON {type(record).__name__}, expected an object")
    image_key = next((k for k in IMAGE_KEYS if k in sample), None)
    if "conversations" not in record and {"caption", "qa", "index"} <= record.keys():
        from distill.toy.shards import (
            conversation_from_record,  # a `python -m distill.toy export` shard
        )

        record = conversation_from_record(record, image=f"{key}.{image_key}")
    if not isinstance(record.get("conversations"), list):
        return Skipped(f"{where}.json", shard, "no conversations",
                       f"the json member has no 'conversations' list (keys: {sorted(record)}); expected a LLaVA "
                       "record or a `python -m distill.toy export` record (caption, qa, index)")
    if image_key is None:
        if IMAGE_PLACEHOLDER in json.dumps(record["conversations"]):
            return Skipped(where, shard, "no image member", f"members {members}, expected one of {list(IMAGE_KEYS)}")
        return record, None, where
    image = decode_image(sample[image_key], f"{where}.{image_key}", shard)
    return image if isinstance(image, Skipped) else (record, image, where)


class WebDataSource(DataSource):
    """webdataset tar shards; each sample has a `json` member (a LLaVA record) and optionally `jpg`/`png`.

    Args:
        urls: shard spec, e.g. "data/{000000..000009}.tar".
        shuffle_buffer: samples in the shuffle buffer (0 = no shuffling).
    """

    def __init__(self, urls: str, shuffle_buffer: int = 1000) -> None:
        self.urls, self.shuffle_buffer = urls, shuffle_buffer

    def samples(self, shuffle: bool = True) -> Iterator[tuple[dict, Image.Image | None, str] | Skipped]:
        """(record, image, 'shard :: key') per sample, split across nodes and DataLoader workers, or Skipped
        markers."""
        import webdataset as wds  # lazy: only shard sources need it

        stages = [wds.SimpleShardList(self.urls), wds.split_by_node, wds.split_by_worker, tar_samples_stage]
        if shuffle and self.shuffle_buffer:
            stages.append(wds.shuffle(self.shuffle_buffer))
        for sample in wds.DataPipeline(*stages):
            yield sample if isinstance(sample, Skipped) else sample_record(sample)

    def dataset(self, encode: SampleEncoder) -> IterableDataset:
        return _WebDataset(self, encode)

    def eval_items(self, limit: int | None = None) -> list[EvalItem]:
        """Questions of the shards in order; unusable samples are warned about and left out."""
        items = []
        for item in self.samples(shuffle=False):
            if isinstance(item, Skipped):
                warnings.warn(f"evaluation {item.message}")
                continue
            record, image, _ = item
            turns = record["conversations"]
            items.append(EvalItem(str(turns[0]["value"]).replace(IMAGE_PLACEHOLDER, "").strip(), str(turns[1]["value"]),
                                  str(record.get("question_type", "all")), record.get("options"), lambda im=image: im))
            if limit is not None and len(items) >= limit:
                break
        return items


class _WebDataset(IterableDataset):
    def __init__(self, source: WebDataSource, encode: SampleEncoder) -> None:
        self.source, self.encode = source, encode

    def __iter__(self) -> Iterator[dict | Skipped]:
        for item in self.source.samples():
            if isinstance(item, Skipped):
                yield item
                continue
            record, image, where = item
            yield encode_or_skip(self.encode, record, image, where, where.split(" :: ")[0])
