"""Load the causal LM and its tokenizer from a local folder, a hub name (online only) or "toy:lm".

    path = resolve_lm_path("toy:lm")          # the toy world's LM folder (resolved by distill.common.names)
    lm, tokenizer = load_lm("toy:lm"), load_tokenizer("toy:lm")
"""

from __future__ import annotations

import pickle
from pathlib import Path

from torch import nn

from distill.common.io import load_checkpoint
from distill.common.names import resolve_path


def resolve_lm_path(spec: str) -> str:
    """'toy:NAME' -> the toy cache folder of NAME; anything else (folder or hub name) unchanged."""
    return resolve_path(spec)


def _check_local_lm(path: str) -> None:
    """A path that looks local must be a Hugging Face model folder (else transformers would try the hub)."""
    looks_local = path.startswith((".", "/", "~")) or Path(path).exists()
    if looks_local and not (Path(path).expanduser() / "config.json").is_file():
        raise FileNotFoundError(
            f"LM folder '{path}' has no config.json; point `lm:` at a Hugging Face model folder "
            "(save_pretrained output) or use 'toy:lm'."
        )


def load_lm(spec: str) -> nn.Module:
    """AutoModelForCausalLM from `spec` (folder, hub name or 'toy:lm')."""
    from transformers import AutoModelForCausalLM

    path = resolve_lm_path(spec)
    _check_local_lm(path)
    try:  # transformers reads .bin weights with weights_only=True; name the file and the refusal if it is unsafe
        return AutoModelForCausalLM.from_pretrained(path)
    except pickle.UnpicklingError:
        for weights in sorted(Path(path).glob("*.bin")):
            load_checkpoint(weights, f"LM '{spec}'")
        raise


def load_tokenizer(spec: str):
    """AutoTokenizer from `spec`; adds a pad token (= eos or unk) when the tokenizer has none, as LLaVA does."""
    from transformers import AutoTokenizer

    path = resolve_lm_path(spec)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer
