"""Conversations as training examples (`data.messages_field`): each row's messages rendered with the tokenizer's
own chat template, only the assistant turns as targets.

    data: {task: causal_lm, dataset: json, data_files: {train: chats.jsonl}, messages_field: messages}

A row holds a list of `{role, content}` (roles: system, user, assistant, tool). Every assistant turn is a target,
up to and with the first special token after its text (the template's end of turn, `<|im_end|>` or `<|eot_id|>`,
whether or not the tokenizer's EOS is that token), not what the template writes after it (a newline, the next
turn's header). Where the template marks the assistant's
tokens (`{% generation %}`), that mask is taken; otherwise each assistant turn is found by rendering the
conversation before it (with the generation prompt) and through it, and both renderings must be prefixes of the
whole one: a template that renders a prefix otherwise (one that drops earlier turns' reasoning) is refused.

`generate_targets` continues each conversation before its last assistant turn (`reply_prompt`, whatever
`block_size` cuts), and its reply takes that turn's place (`teacher_target` holds its content). On-policy KD
continues a block before its last run of targets: the last assistant turn the block holds.
"""

from __future__ import annotations

import re
from typing import Any

from ds_distill.data import IGNORE_INDEX
from ds_distill.errors import ConfigError

ROLES = ("system", "user", "assistant", "tool")
GENERATION_BLOCK = re.compile(r"{%-?\s*generation\s*-?%}")
"""How a template marks what the assistant generates (transformers' `return_assistant_tokens_mask`)."""


def check_rows(conversations: list[Any], where: str) -> None:
    """Refuses a conversation that is not a list of {role, content} messages with an assistant turn after the
    first message, naming its row (`where`: e.g. "split 'train', data.messages_field")."""
    for row, messages in enumerate(conversations):
        at = f"{where}, row {row}"
        if not isinstance(messages, list) or not messages:
            raise ConfigError(
                f"{at}: a conversation is a non-empty list of {{role, content}} messages, got {messages!r}"
            )
        for turn, message in enumerate(messages):
            if not (isinstance(message, dict) and isinstance(message.get("content"), str) and "role" in message):
                raise ConfigError(f"{at}, message {turn}: expected {{role: ..., content: TEXT}}, got {message!r}")
            if message["role"] not in ROLES:
                raise ConfigError(f"{at}, message {turn}: unknown role {message['role']!r}; roles: {', '.join(ROLES)}")
        if messages[0]["role"] == "assistant":
            raise ConfigError(f"{at}: the conversation opens with the assistant, so nothing prompts its first turn")
        if not any(message["role"] == "assistant" for message in messages):
            raise ConfigError(f"{at}: the conversation has no assistant turn, so it has nothing to learn")


def check_template(tokenizer) -> None:
    if not tokenizer.chat_template:
        raise ConfigError(
            f"data.messages_field: the tokenizer {tokenizer.name_or_path} has no chat template to render "
            "conversations with; use a chat model's tokenizer (data.tokenizer) or data.prompt_field"
        )


def last_reply(messages: list[dict]) -> int:
    """The index of the conversation's last assistant turn."""
    return max(index for index, message in enumerate(messages) if message["role"] == "assistant")


def before_reply(messages: list[dict]) -> list[dict]:
    """What a model continues in `generate_targets` and on-policy KD: the messages before the last assistant turn."""
    return messages[: last_reply(messages)]


def reply_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """The tokens a model continues to write the conversation's last assistant turn: the messages before it,
    rendered with the generation prompt and tokenized as `conversation_features` tokenizes the whole."""
    text = tokenizer.apply_chat_template(before_reply(messages), tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def with_reply(messages: list[dict], reply: str) -> list[dict]:
    """The conversation with `reply` (a teacher's) as its last assistant turn's content."""
    index = last_reply(messages)
    return [*messages[:index], {**messages[index], "content": reply}, *messages[index + 1 :]]


def conversation_features(tokenizer, conversations: list[list[dict]], block_size: int) -> dict[str, list]:
    """Each conversation rendered by the chat template and tokenized, cut at `block_size`, with the assistant
    turns' tokens as targets (labels aligned with input_ids; the shift is the model's)."""
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    marks_generation = bool(GENERATION_BLOCK.search(tokenizer.chat_template or ""))
    for messages in conversations:
        ids, targets = (_marked if marks_generation else _from_prefixes)(tokenizer, messages)
        ids, targets = ids[:block_size], targets[:block_size]
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * len(ids))
        rows["labels"].append([token if target else IGNORE_INDEX for token, target in zip(ids, targets)])
    return rows


def _marked(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """(ids, target per token) from the template's own `{% generation %}` marks."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return list(out["input_ids"]), [bool(mark) for mark in out["assistant_masks"]]


def _from_prefixes(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """(ids, target per token): each assistant turn's text lies between the rendering of the conversation before
    it (with the generation prompt) and through it; its tokens are those that start there, up to and with the
    first special token after its text (the template's end of turn)."""
    whole = tokenizer.apply_chat_template(messages, tokenize=False)
    encoded = tokenizer(whole, add_special_tokens=False, return_offsets_mapping=True)
    ids, starts = encoded["input_ids"], [start for start, _ in encoded["offset_mapping"]]
    targets = [False] * len(ids)
    special = set(tokenizer.all_special_ids)  # the end-of-turn token is one, whether or not it is the EOS token
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not (whole.startswith(before) and whole.startswith(through) and len(before) <= len(through)):
            raise ConfigError(
                f"data.messages_field: the chat template of {tokenizer.name_or_path} renders a conversation's first "
                f"{index} messages otherwise than the start of the whole, so its assistant turns cannot be found; "
                "give it {% generation %} marks (transformers' assistant mask) or use data.prompt_field"
            )
        turn = [i for i, start in enumerate(starts) if len(before) <= start < len(through)]
        written = False
        for i in turn:
            targets[i] = True
            if ids[i] not in special:
                written = True
            elif written:  # the end of the turn (`<|im_end|>`, `<|eot_id|>`, ...): what follows is the template's
                break
    return ids, targets


def texts(conversations: list[list[dict]]) -> list[str]:
    """Every message's content (what a tokenizer is checked or trained on)."""
    return [message["content"] for messages in conversations for message in messages if message.get("content")]
