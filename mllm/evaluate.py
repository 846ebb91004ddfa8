"""Score a LLaVA checkpoint: greedy answers to evaluation questions, metrics by question kind, JSON out.

    python -m mllm evaluate --ckpt runs/toy_clip_finetune/.../last.ckpt --out results.json
    results = evaluate_checkpoint("last.ckpt")                  # from Python (compare script)

Default questions: the toy world's held-out images (seed 1000), all their QA pairs.
"""

from __future__ import annotations

import pickle
import time
import warnings
from pathlib import Path
from typing import Any

from distill.io import load_checkpoint, save_json
from mllm.data import DataSource, EvalItem, ToySource
from mllm.generate import generate_answers
from mllm.loading import load_tokenizer
from mllm.metrics import score
from mllm.model import LlavaModel


def evaluate_model(
    model: LlavaModel,
    tokenizer: Any,
    items: list[EvalItem],
    image_size: int = 64,
    max_new_tokens: int = 8,
    batch_size: int = 32,
    chat_template: str | None = None,
    system_prompt: str | None = None,
) -> dict:
    """Metrics (overall and by kind) plus a few example answers for `items`."""
    started = time.time()
    predictions = generate_answers(model, tokenizer, items, image_size, max_new_tokens, batch_size, chat_template,
                                   system_prompt)
    result = score(predictions, [i.answer for i in items], [i.kind for i in items], [i.options for i in items])
    result["seconds"] = round(time.time() - started, 1)
    result["examples"] = [{"question": i.question, "answer": i.answer, "prediction": p}
                          for i, p in list(zip(items, predictions))[:10]]
    return result


def evaluate_checkpoint(
    ckpt_path: str,
    source: DataSource | None = None,
    limit: int | None = None,
    image_size: int = 64,
    max_new_tokens: int = 8,
    batch_size: int = 32,
    system_prompt: str | None = None,
    out_json: str | None = None,
) -> dict:
    """Load a `python -m mllm fit` checkpoint, answer `source`'s eval questions, return (and write) metrics.

    ckpt_path: a LlavaModule checkpoint written by the CLI (its hyper-parameters rebuild the tower and LM).
    source: evaluation questions; None = ToySource(seed=1000, num_images=100, stage="finetune").
    limit: evaluate at most this many questions.
    out_json: also write the result here (atomically).
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
    source = source if source is not None else ToySource(seed=1000, num_images=100, stage="finetune", image_size=image_size)
    result = evaluate_model(module.model, load_tokenizer(hp.lm), source.eval_items(limit), image_size, max_new_tokens,
                            batch_size, hp.chat_template, system_prompt)
    result["checkpoint"] = str(ckpt_path)
    if out_json:
        save_json(result, out_json)
    return result
