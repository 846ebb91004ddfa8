"""The toy LM: loads through Auto classes, its tokenizer and chat template, and pretraining works (tests/test_toy_lm.py)."""

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.toy.lm import build_toy_lm

TEXTS = ["a red circle and a blue square.", "what color is the circle? red", "is there a green star? no",
         "how many objects are there? 2"] * 20


def test_build_load_and_pretrain(tmp_path):
    path = build_toy_lm(TEXTS, tmp_path / "lm", steps=60, seed=0)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "llama" and (path / "model.safetensors").is_file()
    assert [tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token] == \
        ["<pad>", "<s>", "</s>", "<unk>"]
    ids = tokenizer("What color is the circle?", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["what", "color", "is", "the", "circle", "?"]
    assert tokenizer.convert_tokens_to_ids("zebra") == tokenizer.unk_token_id
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "red"}],
                                         tokenize=False)
    assert text.startswith("<s>user : hi assistant : red </s>")
    info = json.loads((path / "toy_lm.json").read_text())
    assert info["final_loss"] < 0.3 * info["first_loss"]
    prompt = tokenizer("<s> what color is the circle ?", add_special_tokens=False, return_tensors="pt")["input_ids"]
    answer = model.generate(prompt, max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert tokenizer.decode(answer[0, -1:]) == "red"  # it learned the corpus


def test_same_seed_same_weights_and_replaces_folder(tmp_path):
    first = build_toy_lm(TEXTS[:8], tmp_path / "a", steps=3, seed=1)
    second = build_toy_lm(TEXTS[:8], tmp_path / "b", steps=3, seed=1)
    a = AutoModelForCausalLM.from_pretrained(first).state_dict()
    b = AutoModelForCausalLM.from_pretrained(second).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    build_toy_lm(TEXTS[:8], first, steps=1)  # rebuilding into an existing folder replaces it
    assert json.loads((first / "toy_lm.json").read_text())["steps"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left
