"""Score a LLaVA checkpoint: greedy answers (or likelihood-ranked candidates) to evaluation questions, metrics by
question kind, every question's prediction and score out.

    python -m mllm evaluate --ckpt runs/mllm/toy_clip/finetune.ckpt --out results.json   # or results.jsonl
    python -m mllm evaluate --ckpt X --json test.json --image-folder img/ --score rank [--skip-missing]
    results = evaluate_checkpoint("last.ckpt")                  # from Python (compare script)

Default questions: the toy world's held-out images (seed HELDOUT_SEED), all their QA pairs.

Every tower must be scored on the same, complete question set: a record whose image file is missing or corrupt is
an error naming the record (file, index, id, path) unless `skip_missing`, which scores the others and reports
the skipped ones ("skipped": count and records). Images are decoded once before scoring to find such records
(and again when scored), so a bad record stops the run before any time is spent.

score="rank": each question's answer is the most likely of its candidates (mllm.scoring.rank_answers, the toy
study's rule): the record's own candidates ("candidates" or "options") when it has them, else the closed
vocabulary of every reference answer in the evaluation set.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import time
import warnings
from pathlib import Path
from typing import Any, Literal

from distill.common.io import atomic_write, load_checkpoint, save_json
from distill.toy.world import HELDOUT_SEED
from mllm.data import DataSource, EvalItem, ToySource, UnusableImage
from mllm.generate import generate_answers
from mllm.loading import load_tokenizer
from mllm.metrics import correctness, score
from mllm.model import LlavaModel


# Used when neither the checkpoint (written before checkpoints carried their data settings) nor a flag sets them.
DEFAULT_DATA_SETTINGS = {"image_size": 64, "pad_to_square": False, "pad_color": None, "chat_template": None,
                         "system_prompt": None, "max_length": 512, "image_first": False}


def evaluate_model(
    model: LlavaModel,
    tokenizer: Any,
    items: list[EvalItem],
    image_size: int = 64,
    max_new_tokens: int = 8,
    batch_size: int = 32,
    chat_template: str | None = None,
    system_prompt: str | None = None,
    pad_to_square: bool = False,
    pad_color: list[int] | None = None,
    score_mode: Literal["generate", "rank"] = "generate",
    vocabulary: list[str] | None = None,
) -> dict:
    """Metrics (overall and by kind) plus every question's prediction and score ("questions") for `items`.

    score_mode: "generate" (greedy answer, up to max_new_tokens) or "rank" (the most likely candidate: the item's
        options, else `vocabulary`; see mllm.scoring.rank_answers).
    vocabulary: candidates of items without options under score_mode="rank" (default: their reference answers).
    """
    started = time.time()
    likelihoods: list[float | None] = [None] * len(items)
    if score_mode == "rank":
        from mllm.scoring import rank_answers

        vocabulary = sorted(set(vocabulary or [i.answer for i in items]))
        items = [item if item.options else dataclasses.replace(item, options=vocabulary) for item in items]
        predictions, scores = rank_answers(model, tokenizer, items, chat_template, system_prompt, batch_size=batch_size,
                                           image_size=image_size, pad_to_square=pad_to_square, pad_color=pad_color,
                                           return_scores=True)
        likelihoods = [max(s) for s in scores]
    elif score_mode == "generate":
        predictions = generate_answers(model, tokenizer, items, image_size, max_new_tokens, batch_size, chat_template,
                                       system_prompt, pad_to_square, pad_color)
    else:
        raise ValueError(f"score_mode={score_mode!r} is unknown; use 'generate' or 'rank'.")
    references, options = [i.answer for i in items], [i.options for i in items]
    if score_mode == "rank":  # a candidate from the vocabulary is right when it is the reference (exact match)
        options = [None] * len(items)
    result = score(predictions, references, [i.kind for i in items], options)
    result["score_mode"] = score_mode
    result["seconds"] = round(time.time() - started, 1)
    correct = correctness(predictions, references, options)
    result["questions"] = [
        {"index": index, "where": item.where, "image_id": item.image_id, "kind": item.kind, "question": item.question,
         "answer": item.answer, "prediction": prediction, "correct": right,
         **({"log_likelihood": likelihood} if likelihood is not None else {})}
        for index, (item, prediction, right, likelihood) in enumerate(zip(items, predictions, correct, likelihoods))]
    return result


def usable_items(items: list[EvalItem], skip_missing: bool = False) -> tuple[list[EvalItem], list[str]]:
    """(items whose image loads, the records left out): a missing or corrupt image is an error naming every such
    record unless skip_missing. Each image is decoded once here (and again when scored)."""
    kept, bad = [], []
    for item in items:
        try:
            item.load_image()
        except UnusableImage as error:
            bad.append(str(error))
            continue
        kept.append(item)
    if bad and not skip_missing:
        raise ValueError(f"{len(bad)} of {len(items)} evaluation questions have an unusable image: {'; '.join(bad[:5])}"
                         f"{' ...' if len(bad) > 5 else ''}. Every tower must be scored on the same complete question "
                         "set: restore the images, or pass --skip-missing to score the others and count these.")
    return kept, bad


def write_results(result: dict, path: str) -> Path:
    """`result` as one JSON file, or for a .jsonl path one question per line (the summary, without "questions",
    goes next to it as <stem>.summary.json). Both are written atomically."""
    out = Path(path)
    if out.suffix != ".jsonl":
        return save_json(result, out)
    summary = {key: value for key, value in result.items() if key != "questions"}
    save_json(summary, out.with_suffix(".summary.json"))

    def write(tmp: str) -> None:
        with open(tmp, "w") as handle:
            for question in result["questions"]:
                handle.write(json.dumps(question) + "\n")

    return atomic_write(out, write)


def resolve_data_settings(saved: dict, model_chat_template: str | None, **overrides: Any) -> dict:
    """The checkpoint's data settings, with every override that is not None replacing the saved value."""
    settings = {**DEFAULT_DATA_SETTINGS, "chat_template": model_chat_template, **saved}
    settings.update({key: value for key, value in overrides.items() if value is not None})
    return settings


def evaluate_checkpoint(
    ckpt_path: str,
    source: DataSource | None = None,
    limit: int | None = None,
    image_size: int | None = None,
    max_new_tokens: int = 8,
    batch_size: int = 32,
    system_prompt: str | None = None,
    out_json: str | None = None,
    pad_to_square: bool | None = None,
    pad_color: list[int] | None = None,
    chat_template: str | None = None,
    num_images: int = 100,
    score_mode: Literal["generate", "rank"] = "generate",
    skip_missing: bool = False,
) -> dict:
    """Load a `python -m mllm fit` checkpoint, answer `source`'s eval questions, return (and write) metrics.

    ckpt_path: a LlavaModule checkpoint written by the CLI (its hyper-parameters rebuild the tower and LM).
    source: evaluation questions; None = the toy world's held-out images, ToySource(seed=HELDOUT_SEED, num_images,
        stage="finetune") at the evaluation image size.
    limit: evaluate at most this many questions.
    image_size, pad_to_square, pad_color, chat_template, system_prompt: None = as the checkpoint was trained (its
        saved data settings); a value overrides them. The settings used are returned as "data_settings".
    out_json: also write the result here (atomically; .jsonl: one question per line, see write_results).
    score_mode: "generate" or "rank" (closed vocabulary: the record's candidates, else every reference answer of
        the source's evaluation set).
    skip_missing: leave out questions whose image is missing or corrupt (counted in "skipped") instead of failing.
    """
    from mllm.module import LlavaModule  # lazy: keeps metric/generation imports Lightning-free

    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"checkpoint '{ckpt_path}' does not exist; pass a .ckpt written by `python -m mllm fit`.")
    with warnings.catch_warnings():
        # By design the checkpoint holds only trained weights; frozen ones come from their own files.
        warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in the checkpoint")
        try:  # weights_only passed explicitly: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot turn unpickling back on
            module = LlavaModule.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            load_checkpoint(ckpt_path, "mllm evaluate --ckpt")  # raises the project's unsafe / unreadable error
            raise
    hp = module.hparams
    saved = getattr(module, "data_settings", {}) or {}
    if not saved:
        warnings.warn(f"checkpoint '{ckpt_path}' carries no data settings (written before they were saved); "
                      f"evaluating with {DEFAULT_DATA_SETTINGS} except where flags say otherwise")
    settings = resolve_data_settings(saved, hp.chat_template, image_size=image_size, pad_to_square=pad_to_square,
                                     pad_color=pad_color, chat_template=chat_template, system_prompt=system_prompt)
    if source is None:
        source = ToySource(seed=HELDOUT_SEED, num_images=num_images, stage="finetune", image_size=settings["image_size"])
    items, skipped = usable_items(source.eval_items(limit), skip_missing)
    vocabulary = [i.answer for i in source.eval_items()] if score_mode == "rank" else None
    result = evaluate_model(module.model, load_tokenizer(hp.lm), items, settings["image_size"],
                            max_new_tokens, batch_size, settings["chat_template"], settings["system_prompt"],
                            settings["pad_to_square"], settings["pad_color"], score_mode, vocabulary)
    result["skipped"] = {"count": len(skipped), "records": skipped}
    result["checkpoint"] = str(ckpt_path)
    result["data_settings"] = settings
    if out_json:
        write_results(result, out_json)
    return result
