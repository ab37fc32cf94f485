"""Conversations as data (`data.messages_field`): the chat template renders each row, and exactly the assistant
turns (with their end-of-turn token, without what the template writes after it) are targets; bad rows and
templates are refused before any weights load, naming the row."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from ds_distill.config.run import DataConfig
from ds_distill.data import IGNORE_INDEX, batches, conversations
from ds_distill.data import tokenized as data
from ds_distill.errors import ConfigError

CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital is Paris."},
    {"role": "user", "content": "And of Germany?"},
    {"role": "assistant", "content": "It is Berlin."},
]
"""Two user turns and two assistant turns."""

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CHATML_MARKED = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML with transformers' `{% generation %}` marks around what the assistant writes."""


@pytest.fixture(scope="module")
def chatml(smollm2):
    return AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="module")
def llama3(smollm2):
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
    )
    tokenizer.eos_token = "<|eot_id|>"
    tokenizer.chat_template = LLAMA3_TEMPLATE
    return tokenizer


def target_runs(tokenizer, row: dict) -> list[str]:
    """The text of each run of consecutive target tokens."""
    runs, current = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs, current = [*runs, current], []
    runs += [current] if current else []
    return [tokenizer.decode(run) for run in runs]


def features(tokenizer, rows=(CONVERSATION,), block_size: int = 512) -> dict:
    return {
        key: value[0] for key, value in conversations.conversation_features(tokenizer, list(rows), block_size).items()
    }


def test_the_converted_smollm2_keeps_its_chatml_template(chatml):
    assert chatml.apply_chat_template(CONVERSATION[:2], tokenize=False) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\nThe capital is Paris.<|im_end|>\n"
    )


def test_chatml_targets_each_assistant_turn_and_its_end_of_turn_not_the_newline_after(chatml):
    row = features(chatml)
    assert row["input_ids"] == chatml.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert target_runs(chatml, row) == ["The capital is Paris.<|im_end|>", "It is Berlin.<|im_end|>"]


def test_the_end_of_turn_ends_a_target_where_the_eos_token_is_another(chatml):
    """A base model's tokenizer with a chat template (Qwen2.5's: EOS `<|endoftext|>`, turns ending `<|im_end|>`)."""
    base = AutoTokenizer.from_pretrained(chatml.name_or_path)
    base.eos_token = "<|endoftext|>"
    assert target_runs(base, features(base)) == ["The capital is Paris.<|im_end|>", "It is Berlin.<|im_end|>"]


def test_llama3_style_targets_each_assistant_turn_with_its_eot(llama3):
    row = features(llama3)
    assert target_runs(llama3, row) == ["The capital is Paris.<|eot_id|>", "It is Berlin.<|eot_id|>"]
    assert llama3.decode(row["input_ids"]).startswith("<|im_start|><|start_header_id|>user<|end_header_id|>\n\n")


def test_a_template_with_generation_marks_gives_the_mask_the_prefixes_give(chatml):
    marked = AutoTokenizer.from_pretrained(chatml.name_or_path)
    marked.chat_template = CHATML_MARKED
    assert conversations.GENERATION_BLOCK.search(marked.chat_template)
    plain = AutoTokenizer.from_pretrained(chatml.name_or_path)
    plain.chat_template = CHATML_MARKED.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    assert features(marked) == features(plain)
    assert target_runs(marked, features(marked)) == ["The capital is Paris.<|im_end|>", "It is Berlin.<|im_end|>"]


def test_a_template_that_renders_a_prefix_otherwise_is_refused_by_name(chatml):
    counting = AutoTokenizer.from_pretrained(chatml.name_or_path)
    counting.chat_template = "{{ messages | length }} turns\n" + CHATML_MARKED.replace("{% generation %}", "").replace(
        "{% endgeneration %}", ""
    )
    with pytest.raises(ConfigError, match=f"the chat template of {counting.name_or_path} renders a conversation's"):
        features(counting)


def test_the_prompt_of_a_conversation_is_everything_before_its_last_assistant_turn(chatml):
    row = features(chatml)
    batch = {key: torch.tensor([value]) for key, value in row.items()}
    (prompt,) = batches.prompts(batch)
    rendered = chatml.apply_chat_template(CONVERSATION[:3], tokenize=False, add_generation_prompt=True)
    assert chatml.decode(prompt) == rendered
    # generate_targets renders it from the messages: the same tokens, and still the whole of them where block_size
    # cuts the last turn off (a block's own prompt is then what comes before its first turn)
    assert conversations.reply_prompt(chatml, CONVERSATION) == prompt
    short = {key: torch.tensor([value]) for key, value in features(chatml, block_size=len(prompt) - 2).items()}
    assert batches.prompts(short)[0] != prompt and conversations.reply_prompt(chatml, CONVERSATION) == prompt
    assert conversations.with_reply(CONVERSATION, "Berlin.")[-1] == {"role": "assistant", "content": "Berlin."}
    assert conversations.with_reply(CONVERSATION, "Berlin.")[:3] == CONVERSATION[:3]


def test_one_assistant_turn_trains_as_its_rendered_prompt_and_completion(chatml, tmp_path):
    """The same example as data.messages_field and as data.prompt_field + text: the same targets after the same
    context, so the same loss (a random Llama on SmolLM2's vocabulary)."""
    messages = CONVERSATION[:2]
    prompt = chatml.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"messages": messages, "prompt": prompt, "text": messages[1]["content"]}) + "\n")
    common = {"task": "causal_lm", "dataset": "json", "data_files": {"train": str(path)}, "block_size": 128}
    rows = {}
    for name, fields in (("messages", {"messages_field": "messages"}), ("prompted", {"prompt_field": "prompt"})):
        config = DataConfig(**common, **fields)
        rows[name] = data.tokenize(config, chatml, data.load_raw(config))["train"][0]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(chatml), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    losses = {}
    for name, row in rows.items():
        with torch.no_grad():
            losses[name] = model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]])).loss
    assert sum(label != IGNORE_INDEX for label in rows["messages"]["labels"]) > 5
    torch.testing.assert_close(losses["messages"], losses["prompted"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "rows, message",
    [
        ([CONVERSATION, "hello"], "row 1: a conversation is a non-empty list"),
        ([CONVERSATION, [{"role": "user", "text": "hi"}]], "row 1, message 0: expected {role: ..., content: TEXT}"),
        ([[{"role": "robot", "content": "hi"}, CONVERSATION[1]]], "row 0, message 0: unknown role 'robot'"),
        ([CONVERSATION[:1]], "row 0: the conversation has no assistant turn"),
        ([CONVERSATION[1:]], "row 0: the conversation opens with the assistant"),
    ],
)
def test_malformed_conversations_are_refused_with_their_row(chatml, tmp_path, rows, message):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"messages": row}) + "\n" for row in rows))
    config = DataConfig(task="causal_lm", dataset="json", data_files={"train": str(path)}, messages_field="messages")
    with pytest.raises(ConfigError, match=re.escape(f"split 'train', data.messages, {message}")):
        data.tokenize(config, chatml, data.load_raw(config))


def test_a_missing_field_and_a_tokenizer_without_a_template_are_refused(chatml, tiny, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"chat": CONVERSATION}) + "\n")
    config = DataConfig(task="causal_lm", dataset="json", data_files={"train": str(path)}, messages_field="messages")
    with pytest.raises(ConfigError, match="messages"):
        data.tokenize(config, chatml, data.load_raw(config))
    path.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    plain = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    with pytest.raises(ConfigError, match="has no chat template to render conversations with"):
        data.tokenize(config, plain, data.load_raw(config))
