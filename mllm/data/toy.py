"""The toy world as LLaVA records (align: captions; finetune: its questions as a chat)."""

from __future__ import annotations

import random
from typing import Literal

from PIL import Image
from torch.utils.data import Dataset

from mllm.conversation import IMAGE_PLACEHOLDER
from mllm.data.base import ALIGN_PROMPT, DataSource, EvalItem, RecordDataset
from mllm.data.encode import SampleEncoder


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
