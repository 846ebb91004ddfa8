"""Command line of the LLaVA stages.

    unitower llava fit -c configs/mllm/toy_align.yaml [--model.tower configs/towers/toy_dino.yaml
        --trainer.default_root_dir runs/mllm/toy_dino]
    unitower llava fit -c configs/mllm/toy_finetune.yaml --model.init_from runs/.../align.ckpt
    unitower llava validate -c configs/mllm/toy_finetune.yaml --ckpt_path last.ckpt
    unitower llava evaluate --ckpt last.ckpt [--limit 500] [--out results.json|results.jsonl]
        [--json test.json --image-folder img/] [--score rank] [--skip-missing]
        (image size, padding, template and system prompt come from the checkpoint unless a flag sets them;
        --out holds every question's prediction and score; a missing or corrupt image is an error naming the
        record unless --skip-missing, which the report counts)
    unitower llava export --ckpt last.ckpt --out hf_llava/      (transformers LlavaForConditionalGeneration folder)

`python -m mllm ...` is the same command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from distill.cli import ATOMIC_CHECKPOINTS, UnitowerCLI
from distill.toy.world import HELDOUT_SEED
from mllm.datamodule import LlavaDataModule
from mllm.module import LlavaModule


ROOT_PLACEHOLDER = "{default_root_dir}"


class LlavaCLI(UnitowerCLI):
    """LightningCLI with the tokenizer and chat template shared by model and data; checkpoint and log
    folders follow trainer.default_root_dir and checkpoints are written atomically (as in distill).
    `{default_root_dir}` in model.init_from is replaced by trainer.default_root_dir (the finetune recipes
    start from `{default_root_dir}/align.ckpt`, so one `--trainer.default_root_dir` moves both stages)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.lm", "data.tokenizer")
        parser.link_arguments("model.chat_template", "data.chat_template")
        # the data module needs the tower's tokens per image: handed over once the model is built
        parser.link_arguments("model", "data.num_image_tokens", compute_fn=tokens_per_image, apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.model.init_from and ROOT_PLACEHOLDER in config.model.init_from:
            root = config.trainer.default_root_dir or os.getcwd()
            config.model.init_from = config.model.init_from.replace(ROOT_PLACEHOLDER, str(root))


def tokens_per_image(module: LlavaModule) -> int:
    """Visual tokens per image of the module's tower (what LlavaDataModule reserves in each sequence)."""
    return module.model.tower.num_tokens


def make_cli(args: list[str] | None = None, run: bool = True) -> LlavaCLI:
    """Build the CLI (run=False only parses and instantiates, as the config tests do)."""
    return LlavaCLI(LlavaModule, LlavaDataModule, args=args, run=run,
                    save_config_kwargs={"overwrite": True}, trainer_defaults=ATOMIC_CHECKPOINTS)


def evaluate_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="unitower llava evaluate", description="Score a LLaVA checkpoint.")
    parser.add_argument("--ckpt", required=True, help="checkpoint written by `unitower llava fit`")
    parser.add_argument("--limit", type=int, default=None, help="at most this many questions")
    parser.add_argument("--num-images", type=int, default=100, help=f"toy held-out images (seed {HELDOUT_SEED})")
    parser.add_argument("--json", default=None, help="LLaVA JSON with questions instead of the toy world")
    parser.add_argument("--image-folder", default=None, help="images of --json")
    parser.add_argument("--image-size", type=int, default=None, help="default: the checkpoint's training image size")
    parser.add_argument("--pad-to-square", action=argparse.BooleanOptionalAction, default=None,
                        help="pad images to square (LLaVA 'pad'); default: as the checkpoint was trained")
    parser.add_argument("--pad-color", type=int, nargs=3, default=None, metavar=("R", "G", "B"),
                        help="0-255 fill of --pad-to-square; default: the checkpoint's")
    parser.add_argument("--chat-template", default=None, help="default: the checkpoint's (e.g. vicuna_v1)")
    parser.add_argument("--system-prompt", default=None, help="default: the checkpoint's")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--score", choices=("generate", "rank"), default="generate",
                        help="generate: greedy answer, exact match; rank: the most likely candidate answer (the "
                             "record's 'candidates'/'options', else every reference answer of the evaluation set)")
    parser.add_argument("--skip-missing", action="store_true",
                        help="score without the questions whose image is missing or corrupt (counted in the report) "
                             "instead of stopping with an error that names them")
    parser.add_argument("--out", default=None,
                        help="write the metrics and every question's prediction and score here (.json, or .jsonl: "
                             "one question per line + <stem>.summary.json)")
    args = parser.parse_args(argv)
    from mllm.data import LlavaJsonSource
    from mllm.evaluate import evaluate_checkpoint

    source = LlavaJsonSource(args.json, args.image_folder) if args.json else None  # None: toy held-out images
    result = evaluate_checkpoint(args.ckpt, source, args.limit, args.image_size, args.max_new_tokens, args.batch_size,
                                 system_prompt=args.system_prompt, out_json=args.out, pad_to_square=args.pad_to_square,
                                 pad_color=args.pad_color, chat_template=args.chat_template, num_images=args.num_images,
                                 score_mode=args.score, skip_missing=args.skip_missing)
    questions = result.pop("questions")
    print(json.dumps(result, indent=2))
    where = f" (every question's prediction and score: {args.out})" if args.out else ""
    print(f"scored {len(questions)} questions, skipped {result['skipped']['count']}{where}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "evaluate":
        evaluate_main(argv[1:])
    elif argv and argv[0] == "export":
        from mllm.hf_export import export_main  # lazy: only the export needs the transformers mapping

        export_main(argv[1:])
    else:
        make_cli(argv)
