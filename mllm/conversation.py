"""LLaVA conversations -> token ids and labels, through the tokenizer's chat template.

A conversation is LLaVA's list `[{"from": "human"|"gpt", "value": "..."}]`; the first human turn may
hold the `<image>` placeholder. `tokenize_conversation` renders it with a chat template, replaces
each `<image>` by `num_image_tokens` copies of IMAGE_TOKEN_ID (spliced by LlavaModel), and sets
labels to IGNORE_INDEX everywhere except the assistant's answers (and the template's end-of-turn
text after them). Truncation at `max_length` never cuts image tokens. Bad conversations raise
ConversationError so datasets can skip and count them.

    ids, labels = tokenize_conversation(record["conversations"], tokenizer, num_image_tokens=16,
                                        max_length=512, num_images=1)
"""

from __future__ import annotations

from typing import Any

IMAGE_PLACEHOLDER = "<image>"
IMAGE_TOKEN_ID = -200
IGNORE_INDEX = -100

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

# Templates for tokenizers that ship without one (e.g. Vicuna-7B for LLaVA-1.5); choose with `chat_template: vicuna_v1`.
CHAT_TEMPLATES = {
    "vicuna_v1": (
        "{{ bos_token }}"
        "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }} {% else %}"
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions. {% endif %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}USER: {{ message['content'] }} "
        "{% elif message['role'] == 'assistant' %}ASSISTANT: {{ message['content'] }}{{ eos_token }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    ),
}


class ConversationError(ValueError):
    """A conversation that cannot be used (bad roles, <image> mismatch, too long); datasets skip and count it."""


def resolve_chat_template(tokenizer: Any, chat_template: str | None) -> str:
    """Named template (CHAT_TEMPLATES), a jinja string, or the tokenizer's own template, in that order."""
    if chat_template:
        return CHAT_TEMPLATES.get(chat_template, chat_template)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    raise ValueError(
        f"tokenizer '{getattr(tokenizer, 'name_or_path', tokenizer)}' has no chat template. Set `chat_template:` "
        f"to one of {sorted(CHAT_TEMPLATES)} or to a jinja template string."
    )


def to_messages(conversations: list[dict], system_prompt: str | None = None) -> list[dict[str, str]]:
    """LLaVA `from/value` turns -> chat `role/content` messages; checks that user and assistant alternate."""
    if not isinstance(conversations, list) or not conversations:
        raise ConversationError("'conversations' must be a non-empty list of {'from', 'value'} turns")
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    expected = "user"
    for position, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ConversationError(f"turn {position} must be a dict with 'from' and 'value', got {turn!r:.80}")
        role = ROLES.get(turn["from"])
        if role is None:
            raise ConversationError(f"turn {position} has unknown speaker {turn['from']!r}; use 'human' or 'gpt'")
        if role == "system":
            messages.append({"role": "system", "content": str(turn["value"])})
            continue
        if role != expected:
            raise ConversationError(f"turn {position} is from {turn['from']!r}; turns must alternate human, gpt, ...")
        messages.append({"role": role, "content": str(turn["value"])})
        expected = "assistant" if role == "user" else "user"
    return messages


def count_placeholders(conversations: list[dict]) -> int:
    """How many `<image>` placeholders the turns hold."""
    return sum(str(turn.get("value", "")).count(IMAGE_PLACEHOLDER) for turn in conversations if isinstance(turn, dict))


def _render(tokenizer: Any, template: str, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
    )


def render_segments(messages: list[dict], tokenizer: Any, template: str) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, is_answer) pieces; answers are what the assistant says."""
    segments: list[tuple[str, bool]] = []
    done = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, template, messages[:index], True)
        full = _render(tokenizer, template, messages[: index + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError(
                "the chat template does not render conversations incrementally (a rendered prefix changes when a "
                "turn is added), so answer tokens cannot be located. Use a template such as 'vicuna_v1'."
            )
        segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    rest = _render(tokenizer, template, messages, False)[len(done):]
    if rest:
        segments.append((rest, False))
    return segments


def _encode_text(text: str, tokenizer: Any, num_image_tokens: int) -> list[int]:
    """Token ids of `text`, with every <image> replaced by num_image_tokens IMAGE_TOKEN_IDs."""
    ids: list[int] = []
    for position, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if position:
            ids += [IMAGE_TOKEN_ID] * num_image_tokens
        if piece:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ids


def tokenize_conversation(
    conversations: list[dict],
    tokenizer: Any,
    num_image_tokens: int,
    max_length: int,
    num_images: int,
    chat_template: str | None = None,
    system_prompt: str | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids and labels (IGNORE_INDEX outside the assistant's answers) of one LLaVA conversation."""
    placeholders = count_placeholders(conversations)
    if placeholders != num_images:
        raise ConversationError(
            f"the record has {num_images} image(s) but {placeholders} '{IMAGE_PLACEHOLDER}' placeholder(s); "
            "each image needs exactly one placeholder in the human turns"
        )
    messages = to_messages(conversations, system_prompt)
    if not any(m["role"] == "assistant" for m in messages):
        raise ConversationError("the conversation has no 'gpt' answer to train on")
    template = resolve_chat_template(tokenizer, chat_template)
    input_ids: list[int] = []
    labels: list[int] = []
    for text, is_answer in render_segments(messages, tokenizer, template):
        ids = _encode_text(text, tokenizer, num_image_tokens)
        input_ids += ids
        labels += [i if is_answer and i != IMAGE_TOKEN_ID else IGNORE_INDEX for i in ids]
    return truncate(input_ids, labels, max_length)


def truncate(input_ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Cut to max_length tokens; raise ConversationError if that would cut image tokens or every answer."""
    if len(input_ids) <= max_length:
        return input_ids, labels
    image_positions = [i for i, token in enumerate(input_ids) if token == IMAGE_TOKEN_ID]
    if image_positions and image_positions[-1] >= max_length:
        raise ConversationError(
            f"conversation of {len(input_ids)} tokens: its image tokens end at position {image_positions[-1] + 1}, "
            f"beyond max_length={max_length}; raise max_length or shorten the text before <image>"
        )
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        raise ConversationError(
            f"conversation is longer than max_length={max_length} and no answer token is left after truncation"
        )
    return input_ids, labels


def prompt_ids(
    question: str,
    tokenizer: Any,
    num_image_tokens: int,
    has_image: bool,
    chat_template: str | None = None,
    system_prompt: str | None = None,
) -> list[int]:
    """Token ids of a one-question prompt ending where the assistant's answer starts (for generation)."""
    if has_image and IMAGE_PLACEHOLDER not in question:
        question = f"{IMAGE_PLACEHOLDER}\n{question}"
    messages = to_messages([{"from": "human", "value": question}], system_prompt)
    text = _render(tokenizer, resolve_chat_template(tokenizer, chat_template), messages, True)
    return _encode_text(text, tokenizer, num_image_tokens)
