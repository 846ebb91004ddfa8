"""webdataset tar shards (a `json` LLaVA record + `jpg`/`png` per sample) as a data source."""

from __future__ import annotations

from typing import Iterator

from PIL import Image
from torch.utils.data import IterableDataset

from mllm.conversation import IMAGE_PLACEHOLDER
from mllm.data.base import DataSource, EvalItem
from mllm.data.encode import SampleEncoder


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
