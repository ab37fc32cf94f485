"""A student as its teacher's speculative draft (train/drafting.py): greedy assisted generation keeps the target's
outputs, the target drafting for itself has its proposals accepted, and pairs that cannot draft are refused."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from ds_distill.config.run import DataConfig
from ds_distill.data import tokenized as data
from ds_distill.errors import ConfigError
from ds_distill.train import drafting
from tests import tiny_models
from tests.conftest import causal_lm_config


def prompts(tiny, kind: str) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    lines = [line for line in open(tiny["text"]["validation"]).read().splitlines() if line.strip()][:6]
    ids = [tokenizer(line)["input_ids"][:12] for line in lines]
    return ids if kind == "seq2seq" else [row[:-1] for row in ids]  # a decoder continues the text


def smaller(model_dir, auto_class, **dims):
    """A random model of `model_dir`'s family and vocabulary, other dimensions."""
    torch.manual_seed(1)
    return auto_class.from_config(AutoConfig.from_pretrained(model_dir, **dims)).eval()


@pytest.mark.parametrize(
    "family, auto_class, dims",
    [
        ("gpt2", AutoModelForCausalLM, {"n_layer": 1, "tie_word_embeddings": False}),
        ("t5", AutoModelForSeq2SeqLM, {"num_layers": 1, "num_decoder_layers": 1}),
    ],
)
def test_the_target_keeps_its_outputs_and_accepts_its_own_proposals(tiny, family, auto_class, dims):
    target = auto_class.from_pretrained(tiny[family]).eval()
    kind = "seq2seq" if family == "t5" else "causal"
    itself = drafting.draft_scores(target, target, prompts(tiny, kind), max_new_tokens=12, pad_token_id=0)
    other = drafting.draft_scores(target, smaller(tiny[family], auto_class, **dims), prompts(tiny, kind), 12, 0)
    for results in (itself, other):
        assert results["draft/identical"] == 1.0 and results["draft/prompts"] == 6
        assert results["draft/tokens_per_s_alone"] > 0 and results["draft/tokens_per_s_with_draft"] > 0
    # its own greedy proposals are the target's tokens: only those cut at the end of a generation (its length, an
    # end id) go unused, which at 12 new tokens and Hugging Face's growing proposals was 13-26% of them
    assert itself["draft/acceptance_rate"] > 0.5 and itself["draft/mean_accepted_tokens"] >= 0.9
    assert other["draft/acceptance_rate"] < itself["draft/acceptance_rate"]


def test_counting_leaves_the_model_as_it_was(tiny):
    target = AutoModelForCausalLM.from_pretrained(tiny["gpt2"]).eval()
    with drafting.counted(target, drafting.DraftCounts()):
        assert "_get_candidate_generator" in vars(target)
    assert "_get_candidate_generator" not in vars(target)


def test_prompts_of_packed_and_prompted_rows(tiny):
    config = DataConfig(**causal_lm_config(tiny, "-")["data"])
    tokenizer = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    blocks = data.tokenize(config, tokenizer, data.load_raw(config))["validation"]
    found = drafting.draft_prompts(blocks, config, "causal", limit=3)
    assert found == [row[: drafting.PACKED_PROMPT_TOKENS] for row in blocks[:3]["input_ids"]]


def test_pairs_that_cannot_draft_are_refused(tiny, tmp_path):
    def check(draft, target, draft_tokenizer=tiny["tokenizer"]):
        configs = [AutoConfig.from_pretrained(path) for path in (draft, target)]
        tokenizers = [AutoTokenizer.from_pretrained(path) for path in (draft_tokenizer, tiny["tokenizer"])]
        drafting.check_pair(*configs, *tokenizers, "--draft_for")

    check(tiny["gpt2"], tiny["gpt2"])
    with pytest.raises(ConfigError, match="--draft_for: an encoder-only model does not generate"):
        check(tiny["bert"], tiny["bert"])
    with pytest.raises(ConfigError, match="both be decoder-only or both encoder-decoder"):
        check(tiny["gpt2"], tiny["t5"])
    other = tiny_models.byte_level_gpt2(tmp_path / "other")
    with pytest.raises(ConfigError, match="the draft's tokenizer is not the target's; drafting across tokenizers"):
        check(other, tiny["gpt2"], draft_tokenizer=other)
