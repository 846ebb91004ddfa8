"""The llava15 recipes carry LLaVA-1.5's settings; LoRA defaults are LLaVA's finetune_lora.sh
(tests/test_llava15_recipes.py)."""

from pathlib import Path

import pytest
import torch

from mllm.cli import LlavaCLI
from mllm.datamodule import LlavaDataModule
from mllm.module import LlavaModule, LoraOptions, _with_lora

CONFIGS = Path(__file__).parents[1] / "configs" / "mllm"


class ParseOnlyCLI(LlavaCLI):
    def instantiate_classes(self) -> None:  # the recipes name 7B weights absent here
        pass


def parse(name: str):
    return ParseOnlyCLI(LlavaModule, LlavaDataModule, args=["-c", str(CONFIGS / f"{name}.yaml")], run=False).config


def test_align_recipe_uses_plain_template():
    config = parse("llava15_align")
    assert config.model.chat_template == config.data.chat_template == "plain"
    assert config.model.projector_lr == 1e-3 and config.data.max_length == 2048 and config.data.image_size == 336


@pytest.mark.parametrize("name", ["llava15_finetune", "llava15_finetune_lora"])
def test_finetune_recipes_use_vicuna_v1_pad_and_image_first(name):
    config = parse(name)
    assert config.data.chat_template == "vicuna_v1"
    assert config.data.pad_to_square and list(config.data.pad_color) == [122, 116, 104]
    assert config.data.image_first


def test_lora_recipe_is_llavas_finetune_lora():
    model = parse("llava15_finetune_lora").model
    assert (model.lora.r, model.lora.alpha, model.lora.dropout) == (128, 256, 0.05)
    assert model.lora.target_modules == "all-linear"
    assert model.lm_lr == 2e-4 and model.projector_lr == 2e-5 and model.stage == "finetune"


def test_lora_defaults_adapt_every_linear_layer_of_the_lm_but_the_head():
    pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    assert (LoraOptions().r, LoraOptions().alpha, LoraOptions().dropout) == (128, 256, 0.05)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4))
    linear = {name for name, m in lm.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"}
    adapted = _with_lora(lm, LoraOptions())
    wrapped = {name.split("base_model.model.", 1)[1] for name, m in adapted.named_modules()
               if hasattr(m, "lora_A") and isinstance(getattr(m, "base_layer", None), torch.nn.Linear)}
    assert wrapped == linear and len(linear) == 14  # q k v o gate up down per layer
    module = next(m for name, m in adapted.named_modules() if name.endswith("layers.0.mlp.down_proj"))
    assert module.r["default"] == 128 and module.scaling["default"] == 2.0
