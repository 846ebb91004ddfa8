"""Score a LLaVA checkpoint: greedy answers to evaluation questions, metrics by question kind, JSON out.

    python -m mllm evaluate --ckpt runs/mllm/toy_clip/finetune.ckpt --out results.json
    results = evaluate_checkpoint("last.ckpt")                  # from Python (compare script)

Default questions: the toy world's held-out images (seed HELDOUT_SEED), all their QA pairs.
"""

from __future__ import annotations

import pickle
import time
import warnings
from pathlib import Path
from typing import Any

from distill.common.io import load_checkpoint, save_json
from distill.toy.world import HELDOUT_SEED
from mllm.data import DataSource, EvalItem, ToySource
from mllm.generate import generate_answers
from mllm.loading import load_tokenizer
from mllm.metrics import score
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
) -> dict:
    """Metrics (overall and by kind) plus a few example answers for `items`."""
    started = time.time()
    predictions = generate_answers(model, tokenizer, items, image_size, max_new_tokens, batch_size, chat_template,
                                   system_prompt, pad_to_square, pad_color)
    result = score(predictions, [i.answer for i in items], [i.kind for i in items], [i.options for i in items])
    result["seconds"] = round(time.time() - started, 1)
    result["examples"] = [{"question": i.question, "answer": i.answer, "prediction": p}
                          for i, p in list(zip(items, predictions))[:10]]
    return result


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
) -> dict:
    """Load a `python -m mllm fit` checkpoint, answer `source`'s eval questions, return (and write) metrics.

    ckpt_path: a LlavaModule checkpoint written by the CLI (its hyper-parameters rebuild the tower and LM).
    source: evaluation questions; None = the toy world's held-out images, ToySource(seed=HELDOUT_SEED, num_images,
        stage="finetune") at the evaluation image size.
    limit: evaluate at most this many questions.
    image_size, pad_to_square, pad_color, chat_template, system_prompt: None = as the checkpoint was trained (its
        saved data settings); a value overrides them. The settings used are returned as "data_settings".
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
    saved = getattr(module, "data_settings", {}) or {}
    if not saved:
        warnings.warn(f"checkpoint '{ckpt_path}' carries no data settings (written before they were saved); "
                      f"evaluating with {DEFAULT_DATA_SETTINGS} except where flags say otherwise")
    settings = resolve_data_settings(saved, hp.chat_template, image_size=image_size, pad_to_square=pad_to_square,
                                     pad_color=pad_color, chat_template=chat_template, system_prompt=system_prompt)
    if source is None:
        source = ToySource(seed=HELDOUT_SEED, num_images=num_images, stage="finetune", image_size=settings["image_size"])
    result = evaluate_model(module.model, load_tokenizer(hp.lm), source.eval_items(limit), settings["image_size"],
                            max_new_tokens, batch_size, settings["chat_template"], settings["system_prompt"],
                            settings["pad_to_square"], settings["pad_color"])
    result["checkpoint"] = str(ckpt_path)
    result["data_settings"] = settings
    if out_json:
        save_json(result, out_json)
    return result
