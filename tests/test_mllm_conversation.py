"""Label masking, image-token expansion and truncation of LLaVA conversations (tests/test_mllm_conversation.py)."""

import pytest

from distill.toy.lm import build_toy_tokenizer
from mllm.conversation import (
    IGNORE_INDEX,
    IMAGE_TOKEN_ID,
    ConversationError,
    prompt_ids,
    tokenize_conversation,
)

# A record exactly as LLaVA releases it (llava_v1_5_mix665k.json style).
RECORD = {
    "id": "000000033471",
    "image": "coco/train2017/000000033471.jpg",
    "conversations": [
        {"from": "human", "value": "<image>\nWhat color is the circle?"},
        {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "Is there a square?"},
        {"from": "gpt", "value": "No."},
    ],
}


@pytest.fixture(scope="module")
def tokenizer():
    return build_toy_tokenizer(["what color is the circle? red. is there a square? no."])


def test_labels_only_on_answers_and_image_tokens_expanded(tokenizer):
    ids, labels = tokenize_conversation(RECORD["conversations"], tokenizer, num_image_tokens=3, max_length=100,
                                        num_images=1)
    words = ["<s>", "user", ":", None, None, None, "what", "color", "is", "the", "circle", "?", "assistant", ":",
             "red", ".", "</s>", "user", ":", "is", "there", "a", "square", "?", "assistant", ":", "no", ".", "</s>"]
    assert len(ids) == len(words)
    for position, word in enumerate(words):
        expected = IMAGE_TOKEN_ID if word is None else tokenizer.convert_tokens_to_ids(word)
        assert ids[position] == expected, position
    answer_positions = {14, 15, 16, 26, 27, 28}  # "red . </s>" and "no . </s>"
    for position, label in enumerate(labels):
        assert label == (ids[position] if position in answer_positions else IGNORE_INDEX), position


def test_placeholder_mismatch_is_rejected(tokenizer):
    with pytest.raises(ConversationError, match="placeholder"):
        tokenize_conversation(RECORD["conversations"], tokenizer, 3, 100, num_images=0)
    no_placeholder = [{"from": "human", "value": "what color?"}, {"from": "gpt", "value": "red"}]
    with pytest.raises(ConversationError, match="placeholder"):
        tokenize_conversation(no_placeholder, tokenizer, 3, 100, num_images=1)


def test_bad_roles_are_rejected(tokenizer):
    with pytest.raises(ConversationError, match="alternate"):
        tokenize_conversation([{"from": "gpt", "value": "red"}], tokenizer, 3, 100, num_images=0)
    with pytest.raises(ConversationError, match="unknown speaker"):
        tokenize_conversation([{"from": "bot", "value": "red"}], tokenizer, 3, 100, num_images=0)


def test_truncation_keeps_image_tokens_and_cuts_text(tokenizer):
    full, _ = tokenize_conversation(RECORD["conversations"], tokenizer, 3, 100, num_images=1)
    ids, labels = tokenize_conversation(RECORD["conversations"], tokenizer, 3, max_length=20, num_images=1)
    assert ids == full[:20] and len(labels) == 20
    assert ids.count(IMAGE_TOKEN_ID) == 3
    with pytest.raises(ConversationError, match="image tokens end"):  # would cut the image
        tokenize_conversation(RECORD["conversations"], tokenizer, 3, max_length=5, num_images=1)
    with pytest.raises(ConversationError, match="no answer token"):  # only the prompt would remain
        tokenize_conversation(RECORD["conversations"], tokenizer, 3, max_length=12, num_images=1)


def test_prompt_ends_at_answer_start(tokenizer):
    ids = prompt_ids("what color is the circle?", tokenizer, 2, has_image=True)
    full, labels = tokenize_conversation(RECORD["conversations"][:2], tokenizer, 2, 100, num_images=1)
    first_answer = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert ids == full[:first_answer]


def test_vicuna_template_masks_answers():
    tokenizer = build_toy_tokenizer(["a chat between a curious user"])
    ids, labels = tokenize_conversation(RECORD["conversations"][:2], tokenizer, 1, 200, 1, chat_template="vicuna_v1")
    answer = [tokenizer.convert_ids_to_tokens(i) for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert answer == ["<unk>", ".", "</s>"]  # "red" is out of this vocabulary; the answer span is still exact


def test_vicuna_v1_is_llavas_text():
    """LLaVA's conv_vicuna_v1: v1 system prompt ("user", not v0's "human"), " " and "</s>" separators."""
    from mllm.conversation import LLAVA_TEMPLATES, VICUNA_V1_SYSTEM, render_conversation, to_messages

    assert VICUNA_V1_SYSTEM == ("A chat between a curious user and an artificial intelligence assistant. The assistant "
                                "gives helpful, detailed, and polite answers to the user's questions.")
    text, spans, _ = render_conversation(to_messages(RECORD["conversations"]), None, LLAVA_TEMPLATES["vicuna_v1"])
    assert text == (VICUNA_V1_SYSTEM + " USER: <image>\nWhat color is the circle? ASSISTANT: Red.</s>"
                    "USER: Is there a square? ASSISTANT: No.</s>")
    assert [text[a:b] for a, b in spans] == [" Red.</s>", " No.</s>"]


def test_image_first_moves_the_placeholder(tokenizer):
    turns = [{"from": "human", "value": "what color is the circle? <image>"}, {"from": "gpt", "value": "red."}]
    ids, labels = tokenize_conversation(turns, tokenizer, 2, 100, 1, image_first=True)
    moved, moved_labels = tokenize_conversation(
        [{"from": "human", "value": "<image>\nwhat color is the circle?"}, turns[1]], tokenizer, 2, 100, 1)
    assert (ids, labels) == (moved, moved_labels)
    kept, _ = tokenize_conversation(turns, tokenizer, 2, 100, 1)
    assert kept.index(IMAGE_TOKEN_ID) > ids.index(IMAGE_TOKEN_ID)


def test_plain_template_trains_caption_and_newline_only(tokenizer):
    turns = [{"from": "human", "value": "what color is the circle?\n<image>"}, {"from": "gpt", "value": "red."}]
    ids, labels = tokenize_conversation(turns, tokenizer, 2, 100, 1, chat_template="plain")
    assert ids[:2] == [IMAGE_TOKEN_ID] * 2  # the question is dropped (no BOS: this tokenizer adds none)
    assert [tokenizer.convert_ids_to_tokens(i) for i in ids[2:]] == ["red", "."]  # the word-level tokenizer drops "\n"
    assert labels == [IGNORE_INDEX] * 2 + ids[2:]
    with pytest.raises(ConversationError, match="plain"):
        tokenize_conversation(RECORD["conversations"], tokenizer, 2, 100, 1, chat_template="plain")


def test_plain_answers_stop_at_newline():
    from mllm.conversation import answer_stop

    assert answer_stop("plain") == "\n"
    assert answer_stop("vicuna_v1") is None and answer_stop(None) is None


@pytest.mark.parametrize("name", ["vicuna_v1", "plain"])
@pytest.mark.parametrize("bos", [True, False])
def test_llava_templates_as_jinja_render_the_same_text(tokenizer, name, bos):
    """What `mllm export` gives the transformers processor: LLaVA's text, with or without the generation prompt."""
    from mllm.conversation import LLAVA_TEMPLATES, llava_template_jinja, render_conversation, to_messages

    template = LLAVA_TEMPLATES[name]
    jinja = llava_template_jinja(template, bos)
    conversations = {"vicuna_v1": RECORD["conversations"], "plain": RECORD["conversations"][:2]}[name]
    start = tokenizer.bos_token if bos else ""
    for system in (None, "Answer briefly."):
        messages = to_messages(conversations, system_prompt=system)
        for cut, generation in ((len(messages), False), (len(messages) - 1, True)):
            ours = render_conversation(messages[:cut], tokenizer, template, generation_prompt=generation)[0]
            theirs = tokenizer.apply_chat_template(messages[:cut], chat_template=jinja, tokenize=False,
                                                   add_generation_prompt=generation)
            assert theirs == start + ours
