"""The toy world as LLaVA records (align: captions; finetune: questions about its objects as a chat).

    ToySource(seed=0, num_images=8000, stage="finetune", records_per_image=4)
    ToySource(seed=0, num_images=8000, stage="finetune", features="runs/features/clip-ab12.safetensors")

With `features`, each record carries the image's cached visual tokens (a frozen tower's output, see
mllm/features.py) instead of its pixels, and the LLaVA model must use a `CachedTower`.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mllm.conversation import IMAGE_PLACEHOLDER
from mllm.data.base import ALIGN_PROMPT, DataSource, EvalItem, RecordDataset
from mllm.data.encode import SampleEncoder


_DESCRIBED: dict[tuple[int, int, int], dict] = {}  # (seed, image_size, max_objects) -> {image index: sample}
MAX_DESCRIBED = 200_000  # described samples kept per world and process (cleared when full)


def described_samples(seed: int, image_size: int, max_objects: int) -> dict:
    """The process-wide {image index: ToyWorld.describe(index)} of one world: a world is a pure function of these
    arguments, so the study's run workers, which train many runs on the same records, describe each image once."""
    return _DESCRIBED.setdefault((seed, image_size, max_objects), {})


class ToySource(DataSource):
    """The toy world as LLaVA records: align = one caption per image; finetune = questions as a chat.

    Args:
        seed: world seed (0 = train, 1000 = held-out).
        num_images: number of images (indices 0 .. num_images-1).
        stage: "align" (caption records) or "finetune" (question/answer records).
        image_size: side of the generated images.
        questions_per_record: finetune turns per record, at most; None = one per object. Each turn asks
            one object (named by its quadrant) a question of a random kind; objects' attributes are drawn
            independently, so no turn's text or answer gives away another's.
        records_per_image: training records per image (dataset length = num_images x this); record r is
            image r % num_images with its question kinds drawn from (seed, r), so repeats ask anew.
        features: a cached-features file (mllm/features.py) of this world's images; records then carry
            the visual tokens [N, C] instead of pixels. Its seed / image_size / max_objects must match.
        max_objects: objects per image at most (1..4, one per quadrant; ToyWorld's argument).
    """

    def __init__(self, seed: int = 0, num_images: int = 2000, stage: Literal["align", "finetune"] = "align",
                 image_size: int = 64, questions_per_record: int | None = None, records_per_image: int = 1,
                 features: str | None = None, max_objects: int = 4) -> None:
        from distill.toy.world import ToyWorld  # lazy: only toy sources need the generator

        if stage not in ("align", "finetune"):
            raise ValueError(f"ToySource stage='{stage}' is unknown; use 'align' or 'finetune'.")
        if questions_per_record is not None and questions_per_record < 1:
            raise ValueError(f"ToySource questions_per_record={questions_per_record}; use a number >= 1 or None (all).")
        if records_per_image < 1:
            raise ValueError(f"ToySource records_per_image={records_per_image}; use a number >= 1.")
        self.questions_per_record = questions_per_record
        self.records_per_image = records_per_image
        self.world = ToyWorld(seed=seed, image_size=image_size, max_objects=max_objects)
        self.seed, self.num_images, self.stage = seed, num_images, stage
        self.features_path = features
        self._features: torch.Tensor | None = None
        # with features: image index -> sample without its pixels, described once per process and world
        self._samples = described_samples(seed, image_size, max_objects) if features is not None else {}

    @property
    def features(self) -> torch.Tensor | None:
        """The cached visual tokens [num_images, N, C] (loaded on first use), or None."""
        if self.features_path is not None and self._features is None:
            from mllm.features import load_features  # lazy: only cached-feature runs need it

            self._features = load_features(self.features_path, seed=self.seed, image_size=self.world.image_size,
                                           num_images=self.num_images, max_objects=self.world.max_objects)
        return self._features

    def visual(self, index: int, image: Image.Image) -> Image.Image | torch.Tensor:
        """What a record of image `index` carries: its cached tokens when `features` is set, else the image."""
        features = self.features
        return image if features is None else features[index]

    def _sample(self, index: int):
        """World sample `index`; with cached features its pixels are not needed, so it is only described
        (ToyWorld.describe: same objects, caption and questions, nothing drawn) and the records of an image
        (records_per_image of them), and every source of the same world in this process, describe it once."""
        if self.features_path is None:
            return self.world[index]
        if index not in self._samples:
            if len(self._samples) >= MAX_DESCRIBED:
                self._samples.clear()
            self._samples[index] = self.world.describe(index)
        return self._samples[index]

    def record(self, index: int) -> dict:
        return self.record_and_image(index)[0]

    def record_and_image(self, index: int) -> tuple[dict, Image.Image | torch.Tensor]:
        """Record `index` (image index % num_images) and its image or cached tokens (generated once)."""
        image_index = index % self.num_images
        sample = self._sample(image_index)
        if self.stage == "align":
            turns = [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{ALIGN_PROMPT}"},
                     {"from": "gpt", "value": sample.caption}]
        else:
            rng = np.random.default_rng([self.seed, index, 7])
            qas = sample.questions(rng)
            qas = [qas[i] for i in rng.permutation(len(qas))][: self.questions_per_record]
            turns = []
            for position, qa in enumerate(qas):
                prefix = f"{IMAGE_PLACEHOLDER}\n" if position == 0 else ""
                turns += [{"from": "human", "value": prefix + qa.question}, {"from": "gpt", "value": qa.answer}]
        record = {"id": f"toy{self.seed}-{index}", "image": image_index, "conversations": turns}
        return record, self.visual(image_index, sample.image)

    def dataset(self, encode: SampleEncoder) -> Dataset:
        count = self.num_images * (self.records_per_image if self.stage == "finetune" else 1)
        records = [{"id": f"toy{self.seed}-{i}", "image": i} for i in range(count)]
        return RecordDataset(records, lambda r: None, _ToyEncode(self, encode))

    def eval_items(self, limit: int | None = None) -> list[EvalItem]:
        """Every question of every object (all kinds) of the first num_images images; `image_index` set."""
        items = []
        for index in range(self.num_images):
            sample = self._sample(index)  # generated once (only described with features); its questions share the image
            visual = self.visual(index, sample.image)
            load = (lambda v=visual: v)
            if self.stage == "align":
                items.append(EvalItem(ALIGN_PROMPT, sample.caption, "caption", None, load, index))
            else:
                items += [EvalItem(q.question, q.answer, q.kind, q.options, load, index) for q in sample.qa]
            if limit is not None and len(items) >= limit:
                break
        return items[:limit]


class _ToyEncode:
    """Generates the toy sample inside the worker (the record holds only its index)."""

    def __init__(self, source: ToySource, encode: SampleEncoder) -> None:
        self.source, self.encode = source, encode

    def __call__(self, record: dict, image: Image.Image | None) -> dict | None:
        return self.encode(*self.source.record_and_image(record["image"]))
