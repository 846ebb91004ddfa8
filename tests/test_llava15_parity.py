"""Golden test: LLaVA-1.5's tokenization and label masking, with a SentencePiece Llama tokenizer built offline
(tests/test_llava15_parity.py).

The tokenizer is a tiny SentencePiece BPE model (byte fallback, dummy prefix, no normalization: Llama's
settings) trained here on sentences this test writes, loaded by transformers' LlamaTokenizer with a Vicuna-style
tokenizer_config.json. LLaVA's `preprocess_multimodal`, `tokenizer_image_token`, `preprocess_v1` and
`preprocess_plain` (llava/train/train.py, llava/mm_utils.py) are re-implemented below from their documented
behaviour: build the prompt text, tokenize it whole (split at <image>), then mask the instructions by token
counts with LLaVA's `-2` offsets and its correction for non-legacy tokenizers. mllm.conversation must give the
same input ids and labels.
"""

import io
import json
import random

import pytest

pytest.importorskip("sentencepiece")
pytest.importorskip("google.protobuf")  # transformers reads the .model proto to convert it

from mllm.conversation import (  # noqa: E402
    IGNORE_INDEX,
    IMAGE_TOKEN_ID,
    VICUNA_V1_SYSTEM,
    prompt_ids,
    tokenize_conversation,
)

WORDS = ("the a red blue green yellow circle square triangle star is are there what which color shape left right "
         "top bottom of in on image picture photo small large big dog cat sits mat how many objects two three one "
         "yes no describe briefly detail user assistant chat between curious and artificial intelligence gives "
         "helpful detailed polite answers to questions it this that near far next").split()


def corpus(count: int = 400) -> list[str]:
    rng = random.Random(0)
    lines = [VICUNA_V1_SYSTEM, "What is in the picture? A small dog sits on a mat."]
    for _ in range(count):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
        words[0] = words[0].capitalize() if rng.random() < 0.5 else words[0]
        lines.append(" ".join(words) + rng.choice([".", "?", "!", ",", ""]))
    return lines


@pytest.fixture(scope="module")
def sp_model_file(tmp_path_factory):
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("sp")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=model, vocab_size=400, model_type="bpe", byte_fallback=True,
        add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return folder


def llama_tokenizer(folder, legacy: bool):
    """LlamaTokenizer from tokenizer.model + a tokenizer_config.json shaped like lmsys/vicuna-7b-v1.5's."""
    from transformers import LlamaTokenizer

    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "pad_token": None, "clean_up_tokenization_spaces": False, "legacy": legacy,
              "model_max_length": 2048, "padding_side": "right", "tokenizer_class": "LlamaTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = LlamaTokenizer.from_pretrained(str(folder), legacy=legacy, use_fast=False)
    tokenizer.pad_token = tokenizer.unk_token  # as LLaVA's train.py does for v1
    return tokenizer


# Vicuna-7B-v1.5 ships legacy=False (LLaVA's train.py corrects its counts for it); legacy=True is Llama-1's.
@pytest.fixture(scope="module", params=[False, True], ids=["legacy_false", "legacy_true"])
def tokenizer(request, sp_model_file):
    return llama_tokenizer(sp_model_file, request.param)


# --------------------------------------------------------------------------------------------------------------
# LLaVA's reference logic, re-implemented from its documented behaviour (IMAGE_TOKEN_INDEX = -200, one per image).

REF_IMAGE = -200


def ref_preprocess_multimodal(turns):
    """<image> moved to the front of its turn: "<image>\\n" + the rest, stripped."""
    out = []
    for turn in turns:
        value = turn["value"]
        if "<image>" in value:
            value = ("<image>\n" + value.replace("<image>", "").strip()).strip()
        out.append({"from": turn["from"], "value": value})
    return out


def ref_vicuna_v1_prompt(turns):
    """conv_vicuna_v1.get_prompt(): system + sep, then role + ": " + message + (sep, sep2)[i % 2]."""
    text = VICUNA_V1_SYSTEM + " "
    for i, turn in enumerate(turns):
        role = "USER" if turn["from"] == "human" else "ASSISTANT"
        text += role + ": " + turn["value"] + (" " if i % 2 == 0 else "</s>")
    return text


def ref_tokenizer_image_token(prompt, tokenizer):
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for index, chunk in enumerate(chunks):
        if index:
            ids.extend(([REF_IMAGE] * (offset + 1))[offset:])
        ids.extend(chunk[offset:])
    return ids


def ref_preprocess_v1(turns, tokenizer, has_image):
    """(input_ids, labels, mismatch) as LLaVA's preprocess_v1 (tokenizers >= 0.14, so its legacy correction applies)."""
    conversation = ref_vicuna_v1_prompt(turns)
    count = (lambda text: len(ref_tokenizer_image_token(text, tokenizer))) if has_image else \
        (lambda text: len(tokenizer(text).input_ids))
    ids = ref_tokenizer_image_token(conversation, tokenizer) if has_image else tokenizer(conversation).input_ids
    target = list(ids)
    sep = " " + "ASSISTANT" + ": "
    cur_len = 1
    target[:cur_len] = [IGNORE_INDEX] * cur_len
    for i, rou in enumerate(conversation.split("</s>")):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = count(rou)
        instruction_len = count(parts[0]) - 2
        if i != 0 and not tokenizer.legacy:
            round_len -= 1
            instruction_len -= 1
        target[cur_len:cur_len + instruction_len] = [IGNORE_INDEX] * len(target[cur_len:cur_len + instruction_len])
        cur_len += round_len
    target[cur_len:] = [IGNORE_INDEX] * len(target[cur_len:])
    mismatch = cur_len != len(ids)
    if mismatch:
        target = [IGNORE_INDEX] * len(ids)
    return ids, target, mismatch


def ref_preprocess_plain(turns, tokenizer):
    """"<image>" + caption + "\\n"; the "<image>" part (BOS and the image token) is masked."""
    assert len(turns) == 2 and "<image>" in turns[0]["value"]
    ids = ref_tokenizer_image_token("<image>" + turns[1]["value"] + "\n", tokenizer)
    masked = len(ref_tokenizer_image_token("<image>", tokenizer))
    return ids, [IGNORE_INDEX] * masked + ids[masked:]


def expand(ids, labels, num_image_tokens):
    """LLaVA's single image index -> num_image_tokens copies (what LlavaModel splices), labels alike."""
    out_ids, out_labels = [], []
    for token, label in zip(ids, labels):
        copies = num_image_tokens if token == REF_IMAGE else 1
        out_ids += [IMAGE_TOKEN_ID if token == REF_IMAGE else token] * copies
        out_labels += [label] * copies
    return out_ids, out_labels


# --------------------------------------------------------------------------------------------------------------

MULTI_TURN = [
    {"from": "human", "value": "<image>\nWhat color is the circle?"},
    {"from": "gpt", "value": "The circle is red."},
    {"from": "human", "value": "How many objects are there?"},
    {"from": "gpt", "value": "Three: a circle, a square and a star."},
    {"from": "human", "value": "Is the dog on the left?"},
    {"from": "gpt", "value": "Yes"},
]
IMAGE_AT_END = [
    {"from": "human", "value": "Describe this picture in detail.\n<image>"},
    {"from": "gpt", "value": "A small dog sits on a blue mat next to a green square."},
    {"from": "human", "value": "What shape is near the dog?"},
    {"from": "gpt", "value": "A square."},
]
TEXT_ONLY = [
    {"from": "human", "value": "What are the two colors of a chat?"},
    {"from": "gpt", "value": "Red and blue, it is helpful."},
    {"from": "human", "value": "Which is large?"},
    {"from": "gpt", "value": "The blue one."},
]
CAPTION = [{"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
           {"from": "gpt", "value": "a yellow star and two cats on a mat"}]


def test_tokenizer_is_the_sentencepiece_model(tokenizer, sp_model_file):
    """The transformers tokenizer gives SentencePiece's own pieces (plain text, no special tokens)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model_file / "tokenizer.model"))
    for text in [VICUNA_V1_SYSTEM, "What color is the circle?", "\nWhat", "ASSISTANT: ", "a  b\n\nc"]:
        assert tokenizer(text, add_special_tokens=False).input_ids == sp.encode(text), text
    assert tokenizer("red").input_ids[0] == tokenizer.bos_token_id == 1
    assert "<0x0A>" in tokenizer.convert_ids_to_tokens(tokenizer("\nWhat").input_ids)  # byte fallback as Llama


@pytest.mark.parametrize("name, turns, has_image", [("multi_turn", MULTI_TURN, True),
                                                    ("image_at_end", IMAGE_AT_END, True),
                                                    ("text_only", TEXT_ONLY, False)])
def test_vicuna_v1_matches_llava_preprocess_v1(tokenizer, name, turns, has_image):
    ref_ids, ref_labels, mismatch = ref_preprocess_v1(ref_preprocess_multimodal(turns), tokenizer, has_image)
    assert not mismatch, "LLaVA's reference counted a tokenization mismatch; the golden data would be all-masked"
    for num_image_tokens in (1, 4):
        ids, labels = tokenize_conversation(turns, tokenizer, num_image_tokens, 2048, int(has_image),
                                            chat_template="vicuna_v1", image_first=True)
        want_ids, want_labels = expand(ref_ids, ref_labels, num_image_tokens)
        assert ids == want_ids, name
        assert labels == want_labels, name
    trained = [t for t in labels if t != IGNORE_INDEX]
    assert trained.count(tokenizer.eos_token_id) == len(turns) // 2  # every answer ends with its trained </s>
    assert tokenizer.decode(trained[: trained.index(tokenizer.eos_token_id)]).strip() == turns[1]["value"]


def test_image_kept_in_place_matches_llava_masking(tokenizer):
    """Without image_first the prompt keeps <image> where the record has it; LLaVA's masking of that text agrees."""
    ref_ids, ref_labels, mismatch = ref_preprocess_v1(IMAGE_AT_END, tokenizer, True)
    assert not mismatch
    ids, labels = tokenize_conversation(IMAGE_AT_END, tokenizer, 1, 2048, 1, chat_template="vicuna_v1")
    assert (ids, labels) == expand(ref_ids, ref_labels, 1)
    assert ids.index(IMAGE_TOKEN_ID) > 20  # still at the end of the first question


def test_plain_matches_llava_preprocess_plain(tokenizer):
    ref_ids, ref_labels = ref_preprocess_plain(CAPTION, tokenizer)
    for num_image_tokens in (1, 3):
        ids, labels = tokenize_conversation(CAPTION, tokenizer, num_image_tokens, 2048, 1, chat_template="plain")
        assert (ids, labels) == expand(ref_ids, ref_labels, num_image_tokens)
    assert ids[:4] == [tokenizer.bos_token_id] + [IMAGE_TOKEN_ID] * 3
    trained = tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
    assert trained == CAPTION[1]["value"] + "\n"  # caption + "\n" only; the question is dropped


def test_generation_prompt_is_the_training_prefix(tokenizer):
    """LLaVA's eval prompt ("... ASSISTANT:") is exactly the training ids before the first trained token."""
    turns = MULTI_TURN[:2]
    ids, labels = tokenize_conversation(turns, tokenizer, 2, 2048, 1, chat_template="vicuna_v1", image_first=True)
    first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert prompt_ids("What color is the circle?", tokenizer, 2, True, "vicuna_v1") == ids[:first]
    caption_ids, caption_labels = tokenize_conversation(CAPTION, tokenizer, 2, 2048, 1, chat_template="plain")
    assert prompt_ids("anything", tokenizer, 2, True, "plain") == caption_ids[:3]
