"""Closed-vocabulary answers by likelihood: each candidate answer is scored by the LM, the best one wins.

For a question with candidate answers (EvalItem.options), every (question, candidate) pair is tokenized
exactly as a training record (`tokenize_conversation`: the same template, image tokens and end-of-turn
token; each distinct pair once, as question texts repeat across images), and the candidate's score is the
sum of the log-probabilities of its label tokens (the answer and the end-of-turn token the template trains
on). The vision tower and projector run once per question (its image's tokens are reused by every candidate
row); the LM scores all pairs in batched forward passes (no generation), so a thousand images' questions take
seconds on a toy LM. Questions are batched in order of candidate count and text length (rows of a batch pad
to similar lengths); with an sdpa / eager LM the candidates of one question run as one sequence on the question's
prompt cache under a 4D mask (`_grouped_suffix_scores`), else each candidate row gets a copy of that cache.

    predictions = rank_answers(model, tokenizer, items, chat_template=None, image_size=64)
    predictions, scores = rank_answers(..., return_scores=True)      # + each item's candidate log-likelihoods

Rows are padded as the tokenizer says (`tokenizer.padding_side`, `tokenizer.pad_token_id`: the checkpoint's LM
folder); position ids follow the attention mask, so left and right padding score alike. Items whose image is a
PIL image are preprocessed like training images (`image_size`, `pad_to_square`, `pad_color`); cached visual
tokens (ToySource with `features`) are used as they are.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F

from mllm.conversation import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_TOKEN_ID, tokenize_conversation
from mllm.data.base import EvalItem
from mllm.data.encode import image_to_tensor
from mllm.model import LlavaModel


def _pairs(item: EvalItem) -> list[list[dict]]:
    question = item.question if IMAGE_PLACEHOLDER in item.question else f"{IMAGE_PLACEHOLDER}\n{item.question}"
    return [[{"from": "human", "value": question}, {"from": "gpt", "value": option}] for option in item.options]


def _padding(tokenizer: Any) -> tuple[int, str]:
    """(pad id, side) of the tokenizer; a tokenizer without a pad token is an error that says what to do."""
    side = getattr(tokenizer, "padding_side", "right") or "right"
    if side not in ("left", "right"):
        raise ValueError(f"rank_answers: tokenizer.padding_side={side!r}; use 'left' or 'right'.")
    if tokenizer.pad_token_id is None:
        raise ValueError("rank_answers: the tokenizer has no pad token; load it with mllm.loading.load_tokenizer "
                         "(which sets pad = unk or eos, as LLaVA does) or set tokenizer.pad_token.")
    return tokenizer.pad_token_id, side


@torch.no_grad()
def rank_answers(model: LlavaModel, tokenizer: Any, items: list[EvalItem], chat_template: str | None = None,
                 system_prompt: str | None = None, batch_size: int = 256, image_size: int = 64,
                 pad_to_square: bool = False, pad_color: list[int] | None = None,
                 return_scores: bool = False, share_prefix: bool = True) -> list[str] | tuple[list[str], list[list[float]]]:
    """The highest-likelihood option of each item (items without options are an error: use generation).

    batch_size: (question, candidate) rows per LM forward pass; the tower sees the questions of those rows once.
    return_scores: also return every item's candidate log-likelihoods (in options order).
    share_prefix: run each question's prompt (what its candidate rows share before the first answer token) once
        and only the candidates' remaining tokens per row, on the LM's key/value cache (`_score_rows_shared`; the
        same scores up to float rounding); False: every row whole (`_score_rows`).
    """
    missing = [i.question for i in items if not i.options]
    if missing:
        raise ValueError(f"rank_answers needs candidate answers (EvalItem.options); {len(missing)} questions have none, "
                         f"e.g. {missing[0]!r}. Score them by generation (mllm.generate) instead.")
    pad_id, side = _padding(tokenizer)
    was_training = model.training
    model.eval()
    num_tokens = model.tower.num_tokens
    device = next(model.projector.parameters()).device
    tokenized: dict[tuple[str, str], tuple[list[int], list[int]]] = {}  # question texts repeat across images
    # questions with as many candidates and as long a text side by side: a batch's rows pad to similar lengths
    order = sorted(range(len(items)), key=lambda i: (len(items[i].options), len(items[i].question)))
    scores: list[list[float]] = []
    for chunk in _question_chunks([items[i] for i in order], batch_size):
        rows: list[tuple[int, list[int], list[int]]] = []  # (question in chunk, input ids, labels)
        for local, item in enumerate(chunk):
            for turns in _pairs(item):
                pair = (turns[0]["value"], turns[1]["value"])
                if pair not in tokenized:
                    tokenized[pair] = tokenize_conversation(turns, tokenizer, num_tokens, 10**6, num_images=1,
                                                            chat_template=chat_template, system_prompt=system_prompt)
                rows.append((local, *tokenized[pair]))
        images = torch.stack([_visual(item.load_image(), image_size, pad_to_square, pad_color) for item in chunk])
        features = model.image_features(images.to(device))  # once per question, shared by its candidates
        score = _score_rows_shared if share_prefix else _score_rows
        row_scores = score(model, rows, features, pad_id, side, device)
        position = 0
        for item in chunk:
            scores.append(row_scores[position:position + len(item.options)])
            position += len(item.options)
    model.train(was_training)
    scores = [score for _, score in sorted(zip(order, scores))]  # back in the items' order
    predictions = [item.options[max(range(len(s)), key=s.__getitem__)] for item, s in zip(items, scores)]
    return (predictions, scores) if return_scores else predictions


def _question_chunks(items: list[EvalItem], batch_size: int) -> list[list[EvalItem]]:
    """Consecutive items whose candidates add up to about batch_size rows (at least one item per chunk)."""
    chunks, current, rows = [], [], 0
    for item in items:
        if current and rows + len(item.options) > batch_size:
            chunks.append(current)
            current, rows = [], 0
        current.append(item)
        rows += len(item.options)
    return chunks + ([current] if current else [])


def _score_rows(model: LlavaModel, rows: list[tuple[int, list[int], list[int]]], features: torch.Tensor,
                pad_id: int, side: str, device: torch.device) -> list[float]:
    """Sum of label log-probabilities of each (question, candidate) row, with its question's visual tokens."""
    length = max(len(ids) for _, ids, _ in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for row, (_, ids, lab) in enumerate(rows):
        span = slice(0, len(ids)) if side == "right" else slice(length - len(ids), length)
        input_ids[row, span], labels[row, span], mask[row, span] = torch.tensor(ids), torch.tensor(lab), 1
    input_ids, labels, mask = input_ids.to(device), labels.to(device), mask.to(device)
    # the LlavaModel.embed splice, with the question's tokens computed once instead of once per row
    embeds = _embed(model, input_ids, features[torch.tensor([local for local, _, _ in rows], device=features.device)])
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)  # left padding: every row's text starts at position 0
    logits = model.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids).logits.float()
    shifted = labels[:, 1:]
    logp = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, shifted.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (logp * (shifted != IGNORE_INDEX)).sum(1).cpu().tolist()


def _embed(model: LlavaModel, input_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Token embeddings with each row's image-token positions filled by its visual tokens [rows, N, C] (the
    LlavaModel.embed splice)."""
    image_mask = input_ids == IMAGE_TOKEN_ID
    embeds = model.lm.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))
    return embeds.masked_scatter(image_mask.unsqueeze(-1), features.to(embeds.dtype))


def _right_pad(rows: list[list[int]], fill: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences as one right-padded LongTensor [len(rows), longest] (padded with `fill`) and its 0/1 mask."""
    width = max(len(row) for row in rows)
    padded = torch.full((len(rows), width), fill, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        padded[i, :len(row)], mask[i, :len(row)] = torch.tensor(row, dtype=torch.long), 1
    return padded, mask


def _shared_length(rows: list[tuple[list[int], list[int]]]) -> int:
    """How many leading tokens all (ids, labels) rows of one question share, cut before the first labelled token
    of any row and leaving at least one token per row."""
    limit = min(min(next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(ids)), len(ids) - 1)
                for ids, labels in rows)
    first = rows[0][0]
    return next((i for i in range(limit) if any(ids[i] != first[i] for ids, _ in rows)), limit)


def _score_rows_shared(model: LlavaModel, rows: list[tuple[int, list[int], list[int]]], features: torch.Tensor,
                       pad_id: int, side: str, device: torch.device) -> list[float]:
    """`_score_rows` with each question's shared prompt run once: the rows of one question agree on their first
    P tokens (`_shared_length`), so one forward pass over the questions' prefixes (right-padded, with the key/value
    cache) gives the prompt's cache and the logits that score each row's first answer token, and a second pass
    runs only the rows' remaining tokens on that cache. Padding is right-sided here whatever `side` is: position
    ids follow the masks, so scores do not depend on it."""
    by_question: dict[int, list[tuple[list[int], list[int]]]] = {}
    for local, ids, labels in rows:
        by_question.setdefault(local, []).append((ids, labels))
    questions = sorted(by_question)
    lengths = {local: _shared_length(by_question[local]) for local in questions}
    suffixes = [(ids[lengths[local]:], labels[lengths[local]:]) for local, ids, labels in rows]
    if min(lengths.values()) < 1 or any(IMAGE_TOKEN_ID in ids for ids, _ in suffixes):
        return _score_rows(model, rows, features, pad_id, side, device)  # nothing shared, or images after it

    prefix_ids, prefix_mask = _right_pad([by_question[local][0][0][:lengths[local]] for local in questions], pad_id)
    prefix_ids, prefix_mask = prefix_ids.to(device), prefix_mask.to(device)
    question_features = features[torch.tensor(questions, device=features.device)]
    out = model.lm(inputs_embeds=_embed(model, prefix_ids, question_features), attention_mask=prefix_mask,
                   position_ids=(prefix_mask.cumsum(-1) - 1).clamp_min(0), use_cache=True)
    prompt_lengths = torch.tensor([lengths[local] for local in questions], device=device)
    first_logp = F.log_softmax(out.logits[torch.arange(len(questions), device=device), prompt_lengths - 1].float(), -1)

    position = {local: q for q, local in enumerate(questions)}
    row_question = torch.tensor([position[local] for local, _, _ in rows], device=device)
    cache_arg = "cache" if "cache" in inspect.signature(model.lm.forward).parameters else "past_key_values"  # transformers 5 / 4
    if _groups_suffixes(model):
        return _grouped_suffix_scores(model, getattr(out, cache_arg), cache_arg, prefix_mask, prompt_lengths,
                                      row_question, suffixes, first_logp, pad_id)
    suffix_ids, suffix_mask = (t.to(device) for t in _right_pad([ids for ids, _ in suffixes], pad_id))
    suffix_labels = _right_pad([labels for _, labels in suffixes], IGNORE_INDEX)[0].to(device)
    cache = getattr(out, cache_arg)
    cache.batch_select_indices(row_question)
    positions = prompt_lengths[row_question].unsqueeze(1) + suffix_mask.cumsum(-1) - 1
    logits = model.lm(inputs_embeds=model.lm.get_input_embeddings()(suffix_ids),
                      attention_mask=torch.cat([prefix_mask[row_question], suffix_mask], dim=1),
                      position_ids=positions.clamp_min(0), **{cache_arg: cache}).logits.float()
    # the first suffix token is scored by the prompt's last logits, token j + 1 by suffix position j
    first = first_logp[row_question].gather(-1, suffix_labels[:, :1].clamp_min(0)).squeeze(-1)
    total = first * (suffix_labels[:, 0] != IGNORE_INDEX)
    shifted = suffix_labels[:, 1:]
    logp = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, shifted.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (total + (logp * (shifted != IGNORE_INDEX)).sum(1)).cpu().tolist()


def _groups_suffixes(model: LlavaModel) -> bool:
    """Whether the LM's attention takes a custom 4D mask (sdpa, eager): then `_grouped_suffix_scores` runs each
    question's candidates in one sequence; other kernels (flash attention) take the per-row copy of the cache."""
    return getattr(model.lm.config, "_attn_implementation", None) in ("sdpa", "eager")


def _grouped_suffix_scores(model: LlavaModel, cache: Any, cache_arg: str, prefix_mask: torch.Tensor,
                           prompt_lengths: torch.Tensor, row_question: torch.Tensor,
                           suffixes: list[tuple[list[int], list[int]]], first_logp: torch.Tensor, pad_id: int) -> list[float]:
    """The rows' scores from their suffixes (what follows the question's shared prompt), with every candidate of one
    question in ONE sequence on that question's prompt cache (no copy of the cache per candidate): a 4D mask lets
    each candidate's tokens see the prompt and that candidate's earlier tokens only, and each candidate's position
    ids restart where the prompt ends, so every token sees what it sees in its whole row."""
    device = prefix_mask.device
    questions, prompt = prefix_mask.shape
    owner = row_question.tolist()
    starts, used = [], [0] * questions
    for question, (ids, _) in zip(owner, suffixes):
        starts.append(used[question])
        used[question] += len(ids)
    width = max(used)
    suffix_ids = torch.full((questions, width), pad_id, dtype=torch.long)
    segment = torch.full((questions, width), -1, dtype=torch.long)  # which row a position belongs to (-1: padding)
    offset = torch.zeros((questions, width), dtype=torch.long)
    for row, (question, start, (ids, _)) in enumerate(zip(owner, starts, suffixes)):
        suffix_ids[question, start:start + len(ids)] = torch.tensor(ids, dtype=torch.long)
        segment[question, start:start + len(ids)] = row
        offset[question, start:start + len(ids)] = torch.arange(len(ids))
    own = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)
    own = (own & torch.ones(width, width, dtype=torch.bool).tril()) | torch.eye(width, dtype=torch.bool)  # padding sees itself
    allowed = torch.cat([prefix_mask.bool().cpu()[:, None, :].expand(questions, width, prompt), own], dim=2)
    embeds = model.lm.get_input_embeddings()(suffix_ids.to(device))
    mask = torch.zeros(allowed.shape, dtype=embeds.dtype).masked_fill(~allowed, torch.finfo(embeds.dtype).min)
    logits = model.lm(inputs_embeds=embeds, attention_mask=mask[:, None].to(device),
                      position_ids=(prompt_lengths[:, None] + offset.to(device)),
                      **{cache_arg: cache}).logits.float()
    logp = F.log_softmax(logits, dim=-1)
    # the first suffix token is scored by the prompt's last logits, token j + 1 by the candidate's position j
    firsts = torch.tensor([labels[0] for _, labels in suffixes], device=device)
    totals = first_logp[row_question].gather(-1, firsts.clamp_min(0)[:, None]).squeeze(-1) * (firsts != IGNORE_INDEX)
    rows, questions_at, places, targets = [], [], [], []
    for row, (question, start, (_, labels)) in enumerate(zip(owner, starts, suffixes)):
        for j, label in enumerate(labels[1:]):
            if label != IGNORE_INDEX:
                rows.append(row), questions_at.append(question), places.append(start + j), targets.append(label)
    if rows:
        picked = logp[torch.tensor(questions_at, device=device), torch.tensor(places, device=device),
                      torch.tensor(targets, device=device)]
        totals = totals.index_add(0, torch.tensor(rows, device=device), picked)
    return totals.cpu().tolist()


def _visual(visual: Any, image_size: int, pad_to_square: bool = False, pad_color: list[int] | None = None) -> torch.Tensor:
    """Cached tokens as they are; a PIL image preprocessed as in training."""
    if isinstance(visual, torch.Tensor):
        return visual
    return image_to_tensor(visual, image_size, pad_to_square, pad_color)
