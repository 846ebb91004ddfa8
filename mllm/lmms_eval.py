"""lmms-eval model entry "unitower": runs a `python -m mllm fit` LLaVA checkpoint on lmms-eval tasks.

    pip install -e ".[lmms]"          # lmms-eval; the `unitower` entry point below is then found by its registry
    python -m lmms_eval --model unitower --model_args ckpt=runs/mllm/toy_clip/finetune.ckpt,image_size=64 \
        --tasks mme --batch_size 8 --output_path results/

    from mllm.lmms_eval import register; register()  # in-process use (simple_evaluate(model="unitower", ...))

lmms-eval (0.7.x) resolves `--model NAME` through its model registry, which reads Python entry points of the group
"lmms_eval.models" (pyproject: `unitower = "mllm.lmms_eval:manifest"`); `register()` does the same in-process, and
also registers the class with lmms-eval's `register_model` decorator registry.

Answers come from the same code as `python -m mllm evaluate` (mllm.generate.generate_answers: the checkpoint's chat
template, one `<image>` per image in front of the question, greedy decoding, left-padded batches), cut at the
task's `until` strings. `loglikelihood` returns, per request, the mean negative log-likelihood of the continuation
tokens (encoded apart from the prompt, as training encodes answers) after the same prompt, and whether greedy
decoding would produce them: lmms-eval's base-class docstring says "log probability", but its multiple_choice
scoring takes the argmin (lmms-eval issue #370) and its own llava / llava_hf models return the LM loss, so this
entry returns the same quantity. Known lmms-eval 0.7.3 bug: the evaluator's unwrap_generation_output turns these
(float, bool) pairs into strings, so multiple_choice tasks crash for every model ("too many values to unpack").
One image per request (LLaVA-1.5's setting); videos and multi-round requests are refused with a message.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.api.registry import register_model
from PIL import Image

from mllm.conversation import IMAGE_PLACEHOLDER, prompt_ids
from mllm.data import EvalItem, image_to_tensor
from mllm.generate import generate_answers

MODEL_NAME = "unitower"


def load_checkpoint(ckpt: str, device: str = "cpu"):
    """(LlavaModule in eval mode, the checkpoint's datamodule settings or {}) of a `python -m mllm fit` checkpoint."""
    from mllm.module import LlavaModule

    if not Path(ckpt).is_file():
        raise FileNotFoundError(f"unitower lmms-eval model: checkpoint '{ckpt}' does not exist; pass "
                                "--model_args ckpt=PATH of a .ckpt written by `python -m mllm fit`.")
    data = torch.load(ckpt, map_location="cpu", weights_only=True).get("datamodule_hyper_parameters") or {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in the checkpoint")
        module = LlavaModule.load_from_checkpoint(ckpt, map_location=device)
    return module.eval(), data


@register_model(MODEL_NAME)
class UnitowerLlava(lmms):
    """A unitower LLaVA checkpoint as an lmms-eval model (`--model unitower --model_args ckpt=...`).

    Args:
        ckpt: checkpoint written by `python -m mllm fit`.
        image_size: side images are resized to before the tower; None = the checkpoint's data setting, else 64.
        batch_size: questions per generation batch.
        max_new_tokens: default generation length when a task gives none.
        device: torch device ("cpu", "cuda").
        system_prompt: optional system message (as `python -m mllm evaluate`).
        pad_to_square: pad images to square before resizing; None = the checkpoint's data setting.
    """

    is_simple = True

    def __init__(self, ckpt: str, image_size: int | None = None, batch_size: int | str = 1, max_new_tokens: int = 16,
                 device: str = "cpu", system_prompt: str | None = None, pad_to_square: bool | None = None,
                 **kwargs: Any) -> None:
        super().__init__()
        if kwargs:
            warnings.warn(f"unitower lmms-eval model: ignoring unknown --model_args {sorted(kwargs)}")
        from mllm.loading import load_tokenizer

        self.module, data = load_checkpoint(ckpt, device)
        self.model = self.module.model
        self.tokenizer = load_tokenizer(self.module.hparams.lm)
        self.chat_template = self.module.hparams.chat_template
        self.image_size = int(image_size or data.get("image_size") or 64)
        self.pad_to_square = bool(data.get("pad_to_square", False) if pad_to_square is None else pad_to_square)
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.system_prompt = system_prompt
        self.device = torch.device(device)

    # ------------------------------------------------------------ requests -> questions

    def _doc(self, task: str, split: str, doc_id: int) -> dict:
        return self.task_dict[task][split][doc_id]

    def _image(self, doc_to_visual: Any, doc_id: int, task: str, split: str) -> Image.Image | None:
        """The request's single image (None when the task has no visual)."""
        visuals = doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual is not None else []
        visuals = [v for v in (visuals or []) if v is not None]
        if len(visuals) > 1:
            raise ValueError(f"unitower lmms-eval model: task '{task}' doc {doc_id} has {len(visuals)} visuals; "
                             "unitower LLaVA models take one image per question.")
        if visuals and not isinstance(visuals[0], Image.Image):
            raise ValueError(f"unitower lmms-eval model: task '{task}' doc {doc_id} gives a {type(visuals[0]).__name__} "
                             "visual (video or audio?); only PIL images are supported.")
        return visuals[0].convert("RGB") if visuals else None

    @staticmethod
    def _question(context: str) -> str:
        """The task's text with lmms-eval's image token (if any) removed: unitower puts `<image>\\n` in front."""
        return context.replace(IMAGE_PLACEHOLDER, "").strip()

    # ------------------------------------------------------------ lmms API

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy answers (generate_answers, as `python -m mllm evaluate`), cut at the first `until` string."""
        groups: dict[int, list[int]] = defaultdict(list)
        settings: list[tuple[int, list[str]]] = []
        items: list[EvalItem] = []
        for index, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)
            image = self._image(doc_to_visual, doc_id, task, split)
            items.append(EvalItem(self._question(context), "", task, None, lambda image=image: image))
            settings.append((max_new, until))
            groups[max_new].append(index)
        answers: list[str] = [""] * len(requests)
        for max_new, indices in groups.items():
            texts = generate_answers(self.model, self.tokenizer, [items[i] for i in indices], self.image_size, max_new,
                                     self.batch_size, self.chat_template, self.system_prompt, self.pad_to_square)
            for index, text in zip(indices, texts):
                for stop in settings[index][1]:
                    if stop and stop in text:
                        text = text.split(stop)[0]
                answers[index] = text
                self.cache_hook.add_partial("generate_until", requests[index].args, text)
        return answers

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(mean -log p(continuation token | prompt, image, previous tokens), continuation == greedy) per request."""
        results = []
        for request in requests:
            args = request.args
            if len(args) == 2:  # lmms-eval's unconditional requests (acc_mutual_info): no image, no doc
                (context, continuation), image = args, None
            else:
                context, target, doc_to_visual, doc_id, task, split = args
                continuation = target if isinstance(target, str) else target(self._doc(task, split, doc_id))
                image = self._image(doc_to_visual, doc_id, task, split)
            results.append(self._continuation_logprob(self._question(context), str(continuation), image))
        return results

    def _continuation_logprob(self, question: str, continuation: str, image: Image.Image | None) -> tuple[float, bool]:
        prompt = prompt_ids(question, self.tokenizer, self.model.tower.num_tokens, image is not None,
                            self.chat_template, self.system_prompt)
        target = self.tokenizer(continuation.strip(), add_special_tokens=False)["input_ids"]
        if not target:
            return 0.0, True
        input_ids = torch.tensor([prompt + target], device=self.device)
        images = None if image is None else image_to_tensor(image, self.image_size, self.pad_to_square)[None].to(self.device)
        logits = self.model(input_ids, torch.ones_like(input_ids), images).logits[0, len(prompt) - 1:-1].float()
        targets = torch.tensor(target, device=self.device)
        logprobs = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
        return float(-logprobs.mean()), bool((logits.argmax(-1) == targets).all())

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("unitower lmms-eval model: multi-round generation is not supported; "
                                  "use single-turn tasks (generate_until / multiple_choice).")


def manifest():
    """lmms-eval ModelManifest of this entry (the `lmms_eval.models` entry point in pyproject.toml)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.UnitowerLlava")


def register() -> None:
    """Make `--model unitower` / simple_evaluate(model="unitower") resolve in this process without reinstalling."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)
