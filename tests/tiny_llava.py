"""Test fixtures (not part of the package): a word-level toy LM and fake toy-world records.

    lm_dir = write_tiny_lm(tmp / "lm")           # Llama LM + tokenizer, ~20 pretraining steps on TINY_TEXTS
    records = tiny_llava_records(tmp, count=8)   # LLaVA JSON records with PNG images written to tmp
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from distill.toy.lm import build_toy_lm

COLORS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")


def tiny_qa(index: int) -> tuple[str, str, str]:
    """(caption, question, answer) of fake sample `index` (color/shape cycle deterministically)."""
    color, shape = COLORS[index % len(COLORS)], SHAPES[index % len(SHAPES)]
    return f"a {color} {shape}.", f"what color is the {shape}?", color


TINY_TEXTS = [text for i in range(12) for text in (tiny_qa(i)[0], " ".join(tiny_qa(i)[1:]),
                                                   "is there a red circle in the image? yes", "describe the image briefly.")]


def write_tiny_lm(folder: str | Path, steps: int = 20, seed: int = 0) -> Path:
    """A tiny pretrained toy LM + tokenizer in Hugging Face format at `folder`."""
    return build_toy_lm(TINY_TEXTS, folder, steps=steps, seed=seed)


def tiny_image(index: int, size: int = 32) -> Image.Image:
    """A solid image whose color follows tiny_qa(index) (so questions are answerable from pixels)."""
    rgb = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 20)}
    array = np.zeros((size, size, 3), np.uint8) + np.array(rgb[COLORS[index % len(COLORS)]], np.uint8)
    return Image.fromarray(array)


def tiny_llava_records(folder: str | Path, count: int = 8, stage: str = "finetune") -> list[dict]:
    """LLaVA-format records (images written as PNG under `folder`); align = captions, finetune = one QA."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(count):
        tiny_image(index).save(folder / f"{index}.png")
        caption, question, answer = tiny_qa(index)
        human, gpt = ("describe the image briefly.", caption) if stage == "align" else (question, answer)
        records.append({"id": str(index), "image": f"{index}.png", "question_type": "color" if stage != "align" else "caption",
                        "conversations": [{"from": "human", "value": f"<image>\n{human}"}, {"from": "gpt", "value": gpt}]})
    return records


def write_llava_json(records: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(records))
    return path
