"""Record + image -> training tensors: image preprocessing, `SampleEncoder` (tokenize one record) and `collate`.

    encode = SampleEncoder(tokenizer, num_image_tokens=64, max_length=512, image_size=64)
    batch = collate([encode(record, image) for record, image in pairs], pad_token_id=tokenizer.pad_token_id)
"""

from __future__ import annotations

import hashlib
import warnings
from collections import Counter
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import to_tensor
from torchvision.transforms.v2 import functional as F

from mllm.conversation import IGNORE_INDEX, ConversationError, tokenize_conversation

# LLaVA-1.5 pads with its CLIP processor's mean x 255 (OpenAI CLIP mean 0.4815, 0.4578, 0.4082 -> 122, 116, 104).
CLIP_PAD_COLOR = (122, 116, 104)


def expand_to_square(image: Image.Image, pad_color: tuple[int, int, int] | list[int]) -> Image.Image:
    """LLaVA's expand2square: paste the image centred on a square canvas of its long side filled with pad_color."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), tuple(int(v) for v in pad_color))
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def image_to_tensor(image: Image.Image, image_size: int, pad_to_square: bool = False,
                    pad_color: tuple[int, int, int] | list[int] | None = None) -> torch.Tensor:
    """RGB [3, image_size, image_size] in [0, 1], as LLaVA-1.5's CLIPImageProcessor before normalization.

    pad_to_square (LLaVA's `image_aspect_ratio: pad`): first pad to square with pad_color (0-255 RGB; None = the
    CLIP processor mean, CLIP_PAD_COLOR). Then resize the short side to image_size (bicubic) and centre-crop
    image_size x image_size (offsets rounded down, as transformers' center_crop), so nothing is squashed.
    """
    image = image.convert("RGB")
    if pad_to_square:
        image = expand_to_square(image, CLIP_PAD_COLOR if pad_color is None else pad_color)
    if image.size != (image_size, image_size):
        image = F.resize(image, [image_size], interpolation=InterpolationMode.BICUBIC)
        width, height = image.size
        image = F.crop(image, (height - image_size) // 2, (width - image_size) // 2, image_size, image_size)
    return to_tensor(image)


MEMO_SIZE = 50_000  # conversations remembered per tokenizer + settings (cleared when full)
MAX_MEMOS = 4  # tokenizer + settings combinations remembered per process (the oldest dropped first)
_MEMOS: dict[tuple, dict[tuple, tuple[list[int], list[int]]]] = {}


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """A hash of everything a tokenizer's output depends on (its serialized fast tokenizer, chat template and
    special tokens), or None when it cannot be serialized (a slow tokenizer): then nothing is shared."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    parts = [type(tokenizer).__name__, backend.to_str(), str(getattr(tokenizer, "chat_template", None)),
             repr(sorted(getattr(tokenizer, "special_tokens_map", {}).items())),
             str(getattr(tokenizer, "padding_side", None)), str(getattr(tokenizer, "truncation_side", None))]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def shared_memo(key: tuple | None) -> dict[tuple, tuple[list[int], list[int]]]:
    """The process-wide memo of one tokenizer + encoder settings `key` (a fresh private one for None): every
    SampleEncoder with the same tokenizer and settings reads and fills it, so a process that trains several runs
    on the same records (the study's run workers) tokenizes each distinct conversation once."""
    if key is None:
        return {}
    if key not in _MEMOS:
        while len(_MEMOS) >= MAX_MEMOS:
            _MEMOS.pop(next(iter(_MEMOS)))
        _MEMOS[key] = {}
    return _MEMOS[key]


class SampleEncoder:
    """Record + image -> {"input_ids", "labels", "image"} tensors, or None for a bad record (counted in `skipped`).

    Args:
        tokenizer: the LM's tokenizer.
        num_image_tokens: tokens per image of the vision tower.
        max_length: max tokens per sample (image tokens never cut).
        image_size: side the images are resized to before the tower's own preprocessing.
        chat_template: template name/string; None = the tokenizer's own.
        system_prompt: optional system message.
        pad_to_square: pad images to square (pad_color) before resizing, LLaVA-1.5's 'pad'; else short-side
            resize + centre crop.
        pad_color: 0-255 RGB fill for pad_to_square; None = the CLIP processor mean (CLIP_PAD_COLOR).
        image_first: move `<image>` to the front of its turn, as LLaVA's preprocess_multimodal.
    """

    def __init__(self, tokenizer: Any, num_image_tokens: int, max_length: int, image_size: int,
                 chat_template: str | None = None, system_prompt: str | None = None, pad_to_square: bool = False,
                 pad_color: tuple[int, int, int] | list[int] | None = None, image_first: bool = False) -> None:
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.image_size = image_size
        self.chat_template = chat_template
        self.system_prompt = system_prompt
        self.pad_to_square = pad_to_square
        self.pad_color = pad_color
        self.image_first = image_first
        self.skipped: Counter = Counter()
        fingerprint = tokenizer_fingerprint(tokenizer)
        self._memo = shared_memo(None if fingerprint is None else (
            fingerprint, num_image_tokens, max_length, chat_template, system_prompt, image_first))

    def tokenize(self, conversations: list[dict], num_images: int) -> tuple[list[int], list[int]]:
        """tokenize_conversation with this encoder's settings, memoized (`shared_memo`: per process, tokenizer and
        settings): small closed worlds (the toy one) repeat the same conversations many times, and rendering a
        chat template costs ~1 ms."""
        key = (num_images, tuple((str(t.get("from")), str(t.get("value"))) for t in conversations))
        if key not in self._memo:
            if len(self._memo) >= MEMO_SIZE:
                self._memo.clear()
            self._memo[key] = tokenize_conversation(
                conversations, self.tokenizer, self.num_image_tokens, self.max_length, num_images=num_images,
                chat_template=self.chat_template, system_prompt=self.system_prompt, image_first=self.image_first,
            )
        return self._memo[key]

    def __call__(self, record: dict, image: Image.Image | None) -> dict | None:
        try:
            input_ids, labels = self.tokenize(record["conversations"], 0 if image is None else 1)
        except ConversationError as error:
            self.skipped[type(error).__name__] += 1
            if sum(self.skipped.values()) <= 5:
                warnings.warn(f"skipping record {record.get('id', '?')}: {error}")
            return None
        return {
            "input_ids": torch.tensor(input_ids),
            "labels": torch.tensor(labels),
            # A tensor is already a tower's cached output (ToySource with `features`): no pixel preprocessing.
            "image": None if image is None else image if isinstance(image, torch.Tensor)
            else image_to_tensor(image, self.image_size, self.pad_to_square, self.pad_color),
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
