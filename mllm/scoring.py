"""Closed-vocabulary answers by likelihood: each candidate answer is scored by the LM, the best one wins.

For a question with candidate answers (EvalItem.options), every (question, candidate) pair is tokenized
exactly as a training record (`tokenize_conversation`: the same template, image tokens and end-of-turn
token; each distinct pair once, as question texts repeat across images), and the candidate's score is the
sum of the log-probabilities of its label tokens (the answer and the end-of-turn token the template trains
on). All pairs are scored in batched forward passes (no generation), so a thousand images' questions take
seconds on a toy LM.

    predictions = rank_answers(model, tokenizer, items, chat_template=None, image_size=64)

Items whose image is a PIL image are preprocessed like training images (`image_size`); cached visual
tokens (ToySource with `features`) are used as they are.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mllm.conversation import IGNORE_INDEX, IMAGE_PLACEHOLDER, tokenize_conversation
from mllm.data.base import EvalItem
from mllm.data.encode import image_to_tensor
from mllm.model import LlavaModel


def _pairs(item: EvalItem) -> list[list[dict]]:
    question = item.question if IMAGE_PLACEHOLDER in item.question else f"{IMAGE_PLACEHOLDER}\n{item.question}"
    return [[{"from": "human", "value": question}, {"from": "gpt", "value": option}] for option in item.options]


@torch.no_grad()
def rank_answers(model: LlavaModel, tokenizer: Any, items: list[EvalItem], chat_template: str | None = None,
                 system_prompt: str | None = None, batch_size: int = 256, image_size: int = 64) -> list[str]:
    """The highest-likelihood option of each item (items without options are an error: use generation)."""
    missing = [i.question for i in items if not i.options]
    if missing:
        raise ValueError(f"rank_answers needs candidate answers (EvalItem.options); {len(missing)} questions have none, "
                         f"e.g. {missing[0]!r}. Score them by generation (mllm.generate) instead.")
    was_training = model.training
    model.eval()
    num_tokens = model.tower.num_tokens
    device = next(model.projector.parameters()).device
    rows: list[tuple[int, list[int], list[int]]] = []  # (item index, input ids, labels)
    tokenized: dict[tuple[str, str], tuple[list[int], list[int]]] = {}  # question texts repeat across images
    for index, item in enumerate(items):
        for turns in _pairs(item):
            pair = (turns[0]["value"], turns[1]["value"])
            if pair not in tokenized:
                tokenized[pair] = tokenize_conversation(turns, tokenizer, num_tokens, 10**6, num_images=1,
                                                        chat_template=chat_template, system_prompt=system_prompt)
            rows.append((index, *tokenized[pair]))
    scores = torch.empty(len(rows))
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        length = max(len(ids) for _, ids, _ in chunk)
        input_ids = torch.full((len(chunk), length), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(chunk), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(chunk), length), dtype=torch.long)
        for row, (_, ids, lab) in enumerate(chunk):
            input_ids[row, :len(ids)], labels[row, :len(lab)], mask[row, :len(ids)] = torch.tensor(ids), torch.tensor(lab), 1
        images = torch.stack([_visual(items[index].load_image(), image_size) for index, _, _ in chunk]).to(device)
        logits = model(input_ids.to(device), mask.to(device), images).logits.float()
        shifted = labels[:, 1:].to(device)
        logp = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, shifted.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        scores[start:start + len(chunk)] = (logp * (shifted != IGNORE_INDEX)).sum(1).cpu()
    model.train(was_training)
    predictions, position = [], 0
    for item in items:
        count = len(item.options)
        predictions.append(item.options[int(scores[position:position + count].argmax())])
        position += count
    return predictions


def _visual(visual: Any, image_size: int) -> torch.Tensor:
    """Cached tokens as they are; a PIL image preprocessed as in training."""
    return visual if isinstance(visual, torch.Tensor) else image_to_tensor(visual, image_size)
