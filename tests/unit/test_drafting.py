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


def without_end_token(path):
    """The byte-level test tokenizer at `path`, encoding a text without appending its end token (as GPT-2's and
    Llama's do), which drafting across tokenizers needs."""
    from tokenizers import processors

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(single="$A")
    return tokenizer


def test_pairs_that_cannot_draft_are_refused(tiny, tmp_path):
    def check(draft, target, draft_tokenizer=None, target_tokenizer=None):
        configs = [AutoConfig.from_pretrained(path) for path in (draft, target)]
        draft_tokenizer = draft_tokenizer or AutoTokenizer.from_pretrained(tiny["tokenizer"])
        drafting.check_pair(
            *configs,
            draft_tokenizer,
            target_tokenizer or AutoTokenizer.from_pretrained(tiny["tokenizer"]),
            "--draft_for",
        )

    check(tiny["gpt2"], tiny["gpt2"])
    with pytest.raises(ConfigError, match="--draft_for: an encoder-only model does not generate"):
        check(tiny["bert"], tiny["bert"])
    with pytest.raises(ConfigError, match="both be decoder-only or both encoder-decoder"):
        check(tiny["gpt2"], tiny["t5"])
    other_t5 = tiny_models.byte_level_t5(tmp_path / "t5")
    with pytest.raises(
        ConfigError,
        match="the draft's tokenizer is not the target's, so Hugging Face would draft .* works for decoder-only pairs",
    ):
        check(other_t5, tiny["t5"], without_end_token(other_t5))
    other = tiny_models.byte_level_gpt2(tmp_path / "gpt2")
    with pytest.raises(ConfigError, match="the draft's tokenizer appends its end token to every text"):
        check(other, tiny["gpt2"], AutoTokenizer.from_pretrained(other))
    with pytest.raises(ConfigError, match="the target's tokenizer appends its end token"):
        check(other, tiny["gpt2"], without_end_token(other))
    with pytest.raises(ConfigError, match="both models have 1024 embeddings, which Hugging Face's universal"):
        check(tiny["gpt2"], tiny["gpt2"], without_end_token(other))
    with pytest.raises(ConfigError, match="the prompts are conversations rendered by the draft's chat template"):
        drafting.check_pair(AutoConfig.from_pretrained(other), AutoConfig.from_pretrained(tiny["gpt2"]),
                            without_end_token(other), AutoTokenizer.from_pretrained(tiny["tokenizer"]), "--draft_for",
                            conversations=True)  # fmt: skip
    # one tokenizer, embeddings padded to another size: Hugging Face drafts by universal assisted decoding there too
    tokenizer = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    for family, refused in (("t5", "works for decoder-only pairs"), ("gpt2", "the draft's tokenizer appends")):
        grown = AutoConfig.from_pretrained(tiny[family], vocab_size=1032)
        with pytest.raises(ConfigError, match=f"the draft has 1032 embeddings and the target 1024, .*{refused}"):
            drafting.check_pair(grown, AutoConfig.from_pretrained(tiny[family]), tokenizer, tokenizer, "--draft_for")


def test_a_draft_with_its_own_tokenizer_proposes_through_the_text(tmp_path):
    """Universal assisted decoding: the target keeps its outputs, and the target itself behind another tokenizer
    (its own plus two added tokens, its embeddings grown to match) has more of its proposals accepted than a
    smaller random model with a vocabulary of its own."""
    import copy

    path = tiny_models.byte_level_gpt2(tmp_path / "target")
    target = AutoModelForCausalLM.from_pretrained(path).eval()
    target_tokenizer, itself_tokenizer = without_end_token(path), without_end_token(path)
    itself_tokenizer.add_tokens(["qqzzx", "zzqqy"])
    itself = copy.deepcopy(target)
    itself.resize_token_embeddings(target.config.vocab_size + 8, mean_resizing=False)
    other_path = tiny_models.byte_level_gpt2(tmp_path / "other", vocab_size=300)
    other = AutoModelForCausalLM.from_pretrained(other_path).eval()

    lines = ["The house is small and the", "A child watched the horse", "We agree that the", "Herr Präsident, ich"]
    prompts = drafting.in_target_tokens([itself_tokenizer(line)["input_ids"] for line in lines], itself_tokenizer,
                                        target_tokenizer)  # fmt: skip
    assert prompts == [target_tokenizer(line)["input_ids"] for line in lines]
    scores = {
        name: drafting.draft_scores(target, draft, prompts, 12, 0, False, (target_tokenizer, tokenizer))
        for name, draft, tokenizer in (("itself", itself, itself_tokenizer),
                                       ("other", other, without_end_token(other_path)))
    }  # fmt: skip
    for results in scores.values():
        assert results["draft/identical"] == 1.0 and results["draft/acceptance_rate"] > 0
    # re-encoding a random model's greedy tokens merges some of them otherwise, so even the target itself is
    # shown another context part of the time: 0.38 against 0.31 when written
    assert scores["itself"]["draft/acceptance_rate"] > scores["other"]["draft/acceptance_rate"] + 0.05

    # the target's own tokenizer, its embeddings grown: Hugging Face needs both tokenizers there too, and the
    # proposals are those of the draft behind the two added tokens (which no text holds)
    padded = drafting.draft_scores(target, itself, prompts, 12, 0, False, (target_tokenizer, target_tokenizer))
    assert padded["draft/identical"] == 1.0
    assert padded["draft/acceptance_rate"] == pytest.approx(scores["itself"]["draft/acceptance_rate"])
    with pytest.raises(ValueError, match="embedding sizes differ: give tokenizers"):
        drafting.draft_scores(target, itself, prompts, 12, 0, False)

    # a prompt on which universal assisted decoding raises (as Hugging Face's can, on a re-encoding that adds no
    # draft token) is left out with a warning and counted; with one tokenizer the error is raised
    generate = target.generate

    def failing_on_the_second(*args, **kwargs):
        if "assistant_model" in kwargs and kwargs["input_ids"][0].tolist() == prompts[1]:
            raise RuntimeError("cannot reshape tensor of 0 elements")
        return generate(*args, **kwargs)

    target.generate = failing_on_the_second
    with pytest.warns(UserWarning, match="universal assisted decoding failed on draft prompt 1 "):
        partial = drafting.draft_scores(target, itself, prompts, 12, 0, False, (target_tokenizer, itself_tokenizer))
    assert partial["draft/prompts"] == 3 and partial["draft/failed_prompts"] == 1
    assert "(1 failed)" in drafting.described(partial)
    with pytest.raises(RuntimeError, match="cannot reshape"):
        drafting.draft_scores(target, target, prompts, 12, 0, False)


def test_an_output_that_differs_with_the_draft_is_reported_and_warned(tiny):
    target = AutoModelForCausalLM.from_pretrained(tiny["gpt2"]).eval()
    generate = target.generate

    def one_token_off(*args, **kwargs):
        output = generate(*args, **kwargs)
        if "assistant_model" in kwargs and kwargs["input_ids"][0].tolist() == found[0]:
            output[0, -1] += 1
        return output

    found = prompts(tiny, "causal")
    target.generate = one_token_off
    with pytest.warns(UserWarning, match="differs from its output alone on 1 of 6 prompts"):
        results = drafting.draft_scores(target, target, found, 12, 0, False)
    assert results["draft/identical"] == pytest.approx(5 / 6)
