"""Greedy answers from a LlavaModel for a list of questions (left-padded batches, KV-cached decoding).

    answers = generate_answers(model, tokenizer, items, image_size=64, max_new_tokens=8)
"""

from __future__ import annotations

from typing import Any

import torch

from mllm.conversation import answer_stop, prompt_ids
from mllm.data import EvalItem, image_to_tensor
from mllm.model import LlavaModel


def generate_answers(
    model: LlavaModel,
    tokenizer: Any,
    items: list[EvalItem],
    image_size: int,
    max_new_tokens: int = 16,
    batch_size: int = 16,
    chat_template: str | None = None,
    system_prompt: str | None = None,
    pad_to_square: bool = False,
    pad_color: tuple[int, int, int] | list[int] | None = None,
) -> list[str]:
    """The model's decoded greedy answer to each item's question (and image), in order.

    Images are prepared as in training (image_size, pad_to_square, pad_color: see mllm.data.image_to_tensor);
    answers end at EOS, or for the 'plain' template at the first newline.
    """
    was_training = model.training
    model.eval()
    num_tokens = model.tower.num_tokens
    device = next(model.projector.parameters()).device
    answers: list[str] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        images = [item.load_image() for item in chunk]
        prompts = [prompt_ids(item.question, tokenizer, num_tokens, image is not None, chat_template, system_prompt)
                   for item, image in zip(chunk, images)]
        length = max(len(p) for p in prompts)
        input_ids = torch.full((len(chunk), length), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), length), dtype=torch.long)
        for row, ids in enumerate(prompts):  # left padding: every prompt ends where its answer starts
            input_ids[row, length - len(ids):] = torch.tensor(ids)
            attention_mask[row, length - len(ids):] = 1
        pixels = [image_to_tensor(im, image_size, pad_to_square, pad_color) for im in images if im is not None]
        new_ids = model.generate(
            input_ids.to(device), attention_mask.to(device), torch.stack(pixels).to(device) if pixels else None,
            max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        texts = tokenizer.batch_decode(new_ids, skip_special_tokens=True)
        stop = answer_stop(chat_template)
        answers += [(text.split(stop)[0] if stop else text).strip() for text in texts]
    model.train(was_training)
    return answers
