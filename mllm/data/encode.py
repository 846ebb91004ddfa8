"""Record + image -> training tensors: image preprocessing, `SampleEncoder` (tokenize one record) and `collate`.

    encode = SampleEncoder(tokenizer, num_image_tokens=64, max_length=512, image_size=64)
    batch = collate([encode(record, image) for record, image in pairs], pad_token_id=tokenizer.pad_token_id)
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.functional import to_tensor

from mllm.conversation import IGNORE_INDEX, ConversationError, tokenize_conversation

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


def collate(samples: list[Any], pad_token_id: int, padding_side: str = "right") -> dict:
    """Pad a batch; drops None samples and Skipped markers (bad records / images), reporting them as
    `num_skipped` and `skipped` (the markers); a batch with no usable sample has input_ids None."""
    kept = [s for s in samples if isinstance(s, dict)]
    skipped = [s for s in samples if not isinstance(s, dict)]
    if not kept:
        return {"input_ids": None, "labels": None, "attention_mask": None, "images": None,
                "num_skipped": len(skipped), "skipped": skipped}
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
        "num_skipped": len(skipped),
        "skipped": skipped,
    }
