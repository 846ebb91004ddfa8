"""LLaVA conversations -> token ids and labels, through LLaVA's own templates or the tokenizer's chat template.

A conversation is LLaVA's list `[{"from": "human"|"gpt", "value": "..."}]`; the first human turn may
hold the `<image>` placeholder. `tokenize_conversation` renders the whole conversation as one text,
tokenizes it as LLaVA's `tokenizer_image_token` does (the text is split at each `<image>`, every piece
tokenized on its own, the first one with the tokenizer's special tokens, and each `<image>` replaced by
`num_image_tokens` copies of IMAGE_TOKEN_ID, spliced by LlavaModel), and sets labels to IGNORE_INDEX
everywhere except the trained spans: the assistant's answers (from the space after "ASSISTANT:" through
the separator after them). Truncation at `max_length` never cuts image tokens. Bad conversations raise
ConversationError so datasets can skip and count them.

Templates (`chat_template`):
    "vicuna_v1"  LLaVA-1.5 stage 2 (llava/conversation.py `conv_vicuna_v1`): system prompt, then
                 "USER: {question} ASSISTANT: {answer}</s>" per round.
    "plain"      LLaVA-1.5 stage 1 (`conv_llava_plain`, train.py `preprocess_plain`): "<image>{caption}\\n";
                 the question is dropped and only the caption and "\\n" are trained.
    None         the tokenizer's own chat template; any other string is used as a jinja template.

The trained span of an answer is located in the tokens of the WHOLE text (the count of tokens of the text
up to the span's start and end), never by tokenizing the answer on its own: with a SentencePiece (Llama)
tokenizer an answer tokenized alone starts with its own "▁" piece, which the whole text does not have.
This gives the same ids and labels as LLaVA's `preprocess_v1` / `preprocess_plain` (its `-2` offsets and
its `legacy` correction compute the same token counts); tests/test_llava15_parity.py checks it with a
SentencePiece Llama tokenizer.

    ids, labels = tokenize_conversation(record["conversations"], tokenizer, num_image_tokens=576,
                                        max_length=2048, num_images=1, chat_template="vicuna_v1", image_first=True)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

IMAGE_PLACEHOLDER = "<image>"
IMAGE_TOKEN_ID = -200
IGNORE_INDEX = -100

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

# llava/conversation.py `conv_vicuna_v1` (LLaVA-1.5's `--version v1`); v0 said "human" where v1 says "user".
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass(frozen=True)
class LlavaTemplate:
    """A LLaVA conversation template (llava/conversation.py), rendered here in Python exactly as LLaVA renders it.

    system: text before the first turn; roles: (user, assistant) names; sep: after user turns and the system
    text; sep2: after assistant turns. plain: LLaVA's PLAIN style (stage 1): "<image>" + answer + sep.
    """

    system: str
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    sep2: str = "</s>"
    plain: bool = False


LLAVA_TEMPLATES = {
    "vicuna_v1": LlavaTemplate(VICUNA_V1_SYSTEM),
    "plain": LlavaTemplate("", ("", ""), sep="\n", sep2="\n", plain=True),
}


def llava_template_jinja(template: LlavaTemplate, bos: bool) -> str:
    """`template` as a jinja chat template for other tools (the transformers processor of `mllm export`): it renders
    the text `_render_llava` renders, with and without the generation prompt, after "{{ bos_token }}" when `bos`
    (unitower tokenizes LLaVA templates with the tokenizer's special tokens, so BOS is there exactly when the
    tokenizer adds one; jinja templates write their own)."""
    start = "{{ bos_token }}" if bos else ""
    if template.plain:  # "<image>" + caption + sep; the question is dropped, the prompt is the image alone
        return (start + IMAGE_PLACEHOLDER + "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}"
                + template.sep + "{% endif %}{% endfor %}")
    user, assistant = template.roles
    return (start + "{% set ns = namespace(system=" + json.dumps(template.system) + ", found=false) %}"
            "{% for m in messages %}{% if m['role'] == 'system' and not ns.found %}"
            "{% set ns.system = m['content'] %}{% set ns.found = true %}{% endif %}{% endfor %}"
            "{{ ns.system }}" + template.sep + "{% for m in messages %}{% if m['role'] == 'user' %}"
            + user + ": {{ m['content'] }}" + template.sep + "{% elif m['role'] == 'assistant' %}"
            + assistant + ": {{ m['content'] }}" + template.sep2 + "{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}" + assistant + ":{% endif %}")


class ConversationError(ValueError):
    """A conversation that cannot be used (bad roles, <image> mismatch, too long); datasets skip and count it."""


def resolve_chat_template(tokenizer: Any, chat_template: str | None) -> str | LlavaTemplate:
    """A LLaVA template (LLAVA_TEMPLATES), a jinja string, or the tokenizer's own template, in that order."""
    if chat_template:
        return LLAVA_TEMPLATES.get(chat_template, chat_template)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    raise ValueError(
        f"tokenizer '{getattr(tokenizer, 'name_or_path', tokenizer)}' has no chat template. Set `chat_template:` "
        f"to one of {sorted(LLAVA_TEMPLATES)} or to a jinja template string."
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


def move_image_first(conversations: list[dict]) -> list[dict]:
    """LLaVA's `preprocess_multimodal`: a turn holding `<image>` becomes "<image>\\n" + its other text, stripped."""
    moved = []
    for turn in conversations:
        value = turn.get("value") if isinstance(turn, dict) else None
        if isinstance(value, str) and IMAGE_PLACEHOLDER in value:
            rest = value.replace(IMAGE_PLACEHOLDER, "").strip()
            turn = {**turn, "value": f"{IMAGE_PLACEHOLDER}\n{rest}".strip()}
        moved.append(turn)
    return moved


# ---------------------------------------------------------------------------------------------------------------
# Rendering: the conversation as one text plus the character spans that are trained.


def _render_jinja(tokenizer: Any, template: str, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
    )


def render_segments(messages: list[dict], tokenizer: Any, template: str) -> list[tuple[str, bool]]:
    """Split a jinja-rendered conversation into (text, is_answer) pieces; answers are what the assistant says."""
    segments: list[tuple[str, bool]] = []
    done = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render_jinja(tokenizer, template, messages[:index], True)
        full = _render_jinja(tokenizer, template, messages[: index + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError(
                "the chat template does not render conversations incrementally (a rendered prefix changes when a "
                "turn is added), so answer tokens cannot be located. Use a template such as 'vicuna_v1'."
            )
        segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    rest = _render_jinja(tokenizer, template, messages, False)[len(done):]
    if rest:
        segments.append((rest, False))
    return segments


def _render_llava(template: LlavaTemplate, messages: list[dict], generation_prompt: bool
                  ) -> tuple[str, list[tuple[int, int]]]:
    """LLaVA's `Conversation.get_prompt` (styles TWO and PLAIN) and the spans LLaVA trains on."""
    turns = [m for m in messages if m["role"] != "system"]
    if template.plain:
        # preprocess_plain: the human turn is replaced by "<image>", then caption + sep; only caption + sep train.
        if generation_prompt:
            return IMAGE_PLACEHOLDER, []
        if len(turns) != 2 or IMAGE_PLACEHOLDER not in turns[0]["content"]:
            raise ConversationError("the 'plain' template (LLaVA stage 1) needs exactly one human turn with <image> "
                                    f"and one gpt answer; got {len(turns)} turn(s)")
        text = IMAGE_PLACEHOLDER + turns[1]["content"] + template.sep
        return text, [(len(IMAGE_PLACEHOLDER), len(text))]
    system = next((m["content"] for m in messages if m["role"] == "system"), template.system)
    text, spans = system + template.sep, []
    for message in turns:
        if message["role"] == "user":
            text += f"{template.roles[0]}: {message['content']}{template.sep}"
        else:
            text += f"{template.roles[1]}:"
            start = len(text)  # the answer's leading space belongs to its first token ("▁Red")
            text += f" {message['content']}{template.sep2}"
            spans.append((start, len(text)))
    if generation_prompt:
        text += f"{template.roles[1]}:"
    return text, spans


def render_conversation(messages: list[dict], tokenizer: Any, template: str | LlavaTemplate,
                        generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]], bool]:
    """(text, trained character spans, add_special_tokens): the tokenizer adds BOS for LLaVA templates (as LLaVA's
    `tokenizer(prompt)` does); jinja templates write their own special tokens."""
    if isinstance(template, LlavaTemplate):
        text, spans = _render_llava(template, messages, generation_prompt)
        return text, spans, True
    if generation_prompt:
        return _render_jinja(tokenizer, template, messages, True), [], False
    text, spans = "", []
    for piece, is_answer in render_segments(messages, tokenizer, template):
        if is_answer:
            spans.append((len(text), len(text) + len(piece)))
        text += piece
    return text, spans, False


# ---------------------------------------------------------------------------------------------------------------
# Tokenization.


def encode_text(text: str, tokenizer: Any, num_image_tokens: int, add_special_tokens: bool = False) -> list[int]:
    """LLaVA's `tokenizer_image_token`: each piece between `<image>`s tokenized alone (special tokens, e.g. BOS,
    only on the first), each `<image>` replaced by num_image_tokens IMAGE_TOKEN_IDs."""
    ids: list[int] = []
    for position, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if position:
            ids += [IMAGE_TOKEN_ID] * num_image_tokens
        special = add_special_tokens and position == 0
        if piece or special:
            ids += tokenizer(piece, add_special_tokens=special)["input_ids"]
    return ids


def _token_boundary(text: str, position: int, full: list[int], tokenizer: Any, num_image_tokens: int,
                    add_special_tokens: bool) -> int:
    """Number of tokens of the whole text's tokenization that cover text[:position] (checked to be a prefix)."""
    if position >= len(text):
        return len(full)
    prefix = encode_text(text[:position], tokenizer, num_image_tokens, add_special_tokens)
    if full[: len(prefix)] != prefix:
        raise ConversationError(
            f"the tokenizer merges text across an answer boundary at character {position} "
            f"({text[max(0, position - 20):position]!r} | {text[position:position + 20]!r}), so the answer's tokens "
            "cannot be separated from the prompt's; use a template whose answers follow a space or separator"
        )
    return len(prefix)


def tokenize_conversation(
    conversations: list[dict],
    tokenizer: Any,
    num_image_tokens: int,
    max_length: int,
    num_images: int,
    chat_template: str | None = None,
    system_prompt: str | None = None,
    image_first: bool = False,
) -> tuple[list[int], list[int]]:
    """Token ids and labels (IGNORE_INDEX outside the trained answer spans) of one LLaVA conversation.

    image_first: move `<image>` to the front of its turn ("<image>\\n" + text), as LLaVA's preprocess_multimodal.
    """
    placeholders = count_placeholders(conversations)
    if placeholders != num_images:
        raise ConversationError(
            f"the record has {num_images} image(s) but {placeholders} '{IMAGE_PLACEHOLDER}' placeholder(s); "
            "each image needs exactly one placeholder in the human turns"
        )
    if image_first:
        conversations = move_image_first(conversations)
    messages = to_messages(conversations, system_prompt)
    if not any(m["role"] == "assistant" for m in messages):
        raise ConversationError("the conversation has no 'gpt' answer to train on")
    template = resolve_chat_template(tokenizer, chat_template)
    text, spans, special = render_conversation(messages, tokenizer, template)
    input_ids = encode_text(text, tokenizer, num_image_tokens, special)
    boundaries = _token_boundaries(text, sorted({p for span in spans for p in span}), input_ids, tokenizer,
                                   num_image_tokens, special)
    labels = [IGNORE_INDEX] * len(input_ids)
    for start, end in spans:
        first, last = boundaries[start], boundaries[end]
        labels[first:last] = [i if i != IMAGE_TOKEN_ID else IGNORE_INDEX for i in input_ids[first:last]]
    return truncate(input_ids, labels, max_length)


def _token_boundaries(text: str, positions: list[int], full: list[int], tokenizer: Any, num_image_tokens: int,
                      add_special_tokens: bool) -> dict[int, int]:
    """Character position -> number of tokens of the whole text before it.

    Fast path: when the pieces between the positions, tokenized one by one, concatenate to the whole text's tokens,
    no token crosses a position and the counts are read off. Otherwise (e.g. a SentencePiece tokenizer with
    legacy=False, which adds no "▁" after "</s>" in the whole text but does at the start of a piece) each position
    is counted from the tokenization of the text before it, checked to be a prefix.
    """
    counts, pieces, start = {}, [], 0
    for position in positions:
        pieces.append(encode_text(text[start:position], tokenizer, num_image_tokens, add_special_tokens and not start))
        start = position
    rest = encode_text(text[start:], tokenizer, num_image_tokens, add_special_tokens and not start)
    if [token for piece in pieces for token in piece] + rest == full:
        total = 0
        for position, piece in zip(positions, pieces):
            total += len(piece)
            counts[position] = total
        return counts
    return {p: _token_boundary(text, p, full, tokenizer, num_image_tokens, add_special_tokens) for p in positions}


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
    """Token ids of a one-question prompt ending where the assistant's answer starts (for generation).

    The image goes first ("<image>\\n" + question) when the question has no placeholder, as LLaVA's eval does;
    with the 'plain' template the prompt is the image alone, as in stage-1 training.
    """
    if has_image and IMAGE_PLACEHOLDER not in question:
        question = f"{IMAGE_PLACEHOLDER}\n{question}"
    messages = to_messages([{"from": "human", "value": question}], system_prompt)
    template = resolve_chat_template(tokenizer, chat_template)
    text, _, special = render_conversation(messages, tokenizer, template, generation_prompt=True)
    return encode_text(text, tokenizer, num_image_tokens, special)


def answer_stop(chat_template: str | None) -> str | None:
    """Text after which a generated answer ends besides EOS ('plain' answers end with "\\n"), else None."""
    template = LLAVA_TEMPLATES.get(chat_template or "")
    return template.sep2 if template is not None and template.plain else None
