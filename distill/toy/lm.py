"""A tiny Llama-family causal LM and word-level tokenizer for the toy world, in Hugging Face format.

`build_toy_lm(texts, out_dir)` builds a word-level tokenizer (lowercased, words and punctuation)
with a user/assistant chat template, briefly pretrains a 2-layer LlamaForCausalLM (hidden 128) on
the given texts, and saves both to `out_dir` so that

    AutoModelForCausalLM.from_pretrained(out_dir); AutoTokenizer.from_pretrained(out_dir)

load them. Takes well under a minute on 2 CPU cores. The toy cache builder calls it with the toy
world's captions and question/answer texts (`unitower toy build`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from distill.common.io import write_dir
from distill.common.schedule import warmup_cosine

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"

# Turns are "user : ... assistant : ... </s>"; the assistant's answer and its </s> are what LLaVA trains on.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }} "
    "{% elif message['role'] == 'user' %}user : {{ message['content'] }} "
    "{% else %}assistant : {{ message['content'] }} {{ eos_token }} {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)
# Words the chat template and common prompts use, so they are never <unk> even if absent from the texts.
TEMPLATE_WORDS = ["user", "assistant", ":", "?", ".", ",", "yes", "no", "answer", "the", "a", "with", "word",
                  "single", "using", "question", "describe", "image", "briefly"] + [str(d) for d in range(10)]


def build_toy_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer whose vocabulary is every lowercased word/punctuation mark in `texts`."""
    normalizer = normalizers.Lowercase()
    pre_tokenizer = pre_tokenizers.Whitespace()
    words: set[str] = set(TEMPLATE_WORDS)
    for text in texts:
        words.update(piece for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    vocab = {token: i for i, token in enumerate([PAD, BOS, EOS, UNK] + sorted(words))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizer
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        clean_up_tokenization_spaces=True,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def toy_lm_config(vocab_size: int, pad_id: int, bos_id: int, eos_id: int) -> LlamaConfig:
    """The tiny Llama architecture: 2 layers, hidden 128, 4 heads, 512 positions, tied embeddings."""
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id, tie_word_embeddings=True,
    )


def _packed_blocks(tokenizer: PreTrainedTokenizerFast, texts: list[str], block: int) -> torch.Tensor:
    """All texts as `<s> text </s>` concatenated and cut into [num_blocks, block] token ids."""
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream += [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    if len(stream) < block + 1:  # tiny corpora: repeat so at least one block exists
        stream = stream * (block // max(len(stream), 1) + 2)
    usable = len(stream) // block * block
    return torch.tensor(stream[:usable]).view(-1, block)


def build_toy_lm(texts: list[str], out_dir: str | Path, steps: int = 300, seed: int = 0) -> Path:
    """Build, pretrain (next-token loss, `steps` AdamW steps) and save the toy LM + tokenizer to `out_dir`.

    texts: the corpus (captions, questions, answers); also defines the vocabulary.
    out_dir: target folder; written to a temp folder first and renamed, replacing an old one.
    steps: pretraining steps (batch 32 x 64 tokens).
    seed: seed for initialization and batch order.
    Returns `out_dir` as a Path. A `toy_lm.json` beside the weights records the build (loss, time).
    """
    if not texts:
        raise ValueError("build_toy_lm needs a non-empty list of texts (the toy world's captions and QA).")
    out_dir = Path(out_dir)
    started = time.time()
    torch.manual_seed(seed)
    tokenizer = build_toy_tokenizer(texts)
    config = toy_lm_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    blocks = _packed_blocks(tokenizer, texts, block=64)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = warmup_cosine(optimizer, max(1, steps // 20), steps, warmup="scale")
    model.train()
    first_loss = last_loss = float("nan")
    for step in range(steps):
        batch = blocks[torch.randint(len(blocks), (32,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        last_loss = loss.item()
        if step == 0:
            first_loss = last_loss
    model.eval()
    info = {"steps": steps, "seed": seed, "num_texts": len(texts), "vocab_size": len(tokenizer),
            "first_loss": first_loss, "final_loss": last_loss, "seconds": round(time.time() - started, 1)}

    def write(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        (folder / "toy_lm.json").write_text(json.dumps(info, indent=2))

    write_dir(out_dir, write)
    return out_dir
