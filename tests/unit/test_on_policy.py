"""On-policy KD (GKD) and sequence-level KD's data: which micro-batches sample, which sampled tokens count, the
term on them against GKD's objective written out, and training examples with the teacher's targets."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import GenerationConfig

from ds_distill.config.losses import OnPolicyOptions
from ds_distill.config.run import DataConfig, RunConfig
from ds_distill.config.typed import from_dict
from ds_distill.data import tokenized as data
from ds_distill.data import tokenizers
from ds_distill.errors import ConfigError
from ds_distill.objectives.registry import build_losses
from ds_distill.train.on_policy import OnPolicy
from ds_distill.train.prepare import on_policy_options
from tests import tiny_models
from tests.conftest import translation_config
from tests.unit.test_losses import TEACHER_PRESENT, reference

EOS, PAD, VOCAB = 1, 0, 40


class Tokenizer:
    """What OnPolicy reads of a tokenizer."""

    def __init__(self, eos=EOS, pad=PAD, size=VOCAB):
        self.eos_token_id, self.pad_token_id, self.size = eos, pad, size

    def __len__(self):
        return self.size


def policy(kind: str = "seq2seq", prompted: bool = False, tokenizer=None, generation_config=None, **options):
    adapter = type("Adapter", (), {"kind": kind})()
    tokenizer = tokenizer or Tokenizer()
    generation_config = generation_config or GenerationConfig(eos_token_id=tokenizer.eos_token_id)
    return OnPolicy(OnPolicyOptions(**options), 3, adapter, tokenizer, generation_config, synced=False,
                    prompted=prompted)  # fmt: skip


def test_the_share_of_on_policy_micro_batches_is_seeded_and_the_same_for_a_resumed_run():
    chosen = [policy(fraction=0.3).chooses(i) for i in range(4000)]
    assert abs(sum(chosen) / 4000 - 0.3) < 0.03
    assert [policy(fraction=0.3).chooses(i) for i in range(1000, 1200)] == chosen[1000:1200]  # any start
    assert not any(policy(fraction=0.0).chooses(i) for i in range(1000))
    assert all(policy(fraction=1.0).chooses(i) for i in range(1000))


def test_sampled_tokens_count_up_to_and_with_the_first_end_of_sequence():
    """Encoder-decoder: generate's output starts with the decoder's start token and pads after EOS."""
    batch = {
        "input_ids": torch.tensor([[5, 6, EOS], [7, EOS, PAD]]),
        "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
    }
    outputs = torch.tensor([[PAD, 9, 8, EOS, PAD], [PAD, 4, EOS, PAD, PAD]])
    sampled = policy()._as_targets(batch, outputs)
    assert sampled["labels"].tolist() == [[9, 8, EOS, -100], [4, EOS, -100, -100]]
    assert sampled["decoder_input_ids"].tolist() == [[PAD, 9, 8, EOS], [PAD, 4, EOS, PAD]]
    assert sampled["input_ids"] is batch["input_ids"]

    # decoder-only: the block's first prompt_tokens are the prompt and not targets
    block = {"input_ids": torch.arange(10, 18).view(1, 8), "attention_mask": torch.ones(1, 8, dtype=torch.long)}
    outputs = torch.tensor([[10, 11, 12, 40, 41, EOS, EOS, EOS]])
    sampled = policy("causal", prompt_tokens=3)._as_targets(block, outputs)
    assert sampled["labels"].tolist() == [[-100, -100, -100, 40, 41, EOS, -100, -100]]
    assert sampled["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1, 0, 0]]


def test_a_run_samples_where_its_weighted_kd_term_has_a_fraction_above_0(tiny):
    """One rule (`on_policy_options`) for the checks before weights load and the trainer."""

    def options(kd: dict):
        return on_policy_options(from_dict(RunConfig, translation_config(tiny, "-", losses={"kd": kd})))

    assert options({"on_policy": {"fraction": 0.25, "max_new_tokens": 8}}) == OnPolicyOptions(0.25, max_new_tokens=8)
    assert options({"on_policy": {}}) == OnPolicyOptions()  # fraction 0.5
    assert options({"on_policy": {"fraction": 0.0}}) is None
    assert options({"weight": 0.0, "on_policy": {"fraction": 0.5}}) is None
    assert options({"temperature": 2.0}) is None


def test_a_sample_ends_at_any_of_the_models_end_ids_and_nothing_after_it_is_a_target():
    """A Llama-3- or Qwen-Instruct-like model: generation ends at 4 or 5, the tokenizer's EOS is 4, and generate
    pads with 5 after a row's end; every end id ends a sample."""
    tokenizer = Tokenizer(eos=4, pad=5)
    sampling = policy("causal", tokenizer=tokenizer, generation_config=GenerationConfig(eos_token_id=[5, 4]),
                      prompt_tokens=2)  # fmt: skip
    assert sampling.end_ids == [4, 5] and sampling.sampling.eos_token_id == [4, 5]
    block = {"input_ids": torch.arange(10, 18).view(2, 4), "attention_mask": torch.ones(2, 4, dtype=torch.long)}
    outputs = torch.tensor([[10, 11, 30, 5, 5, 5], [14, 15, 31, 32, 4, 5]])
    sampled = sampling._as_targets(block, outputs)
    assert sampled["labels"].tolist() == [[-100, -100, 30, 5, -100, -100], [-100, -100, 31, 32, 4, -100]]
    assert sampled["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]]

    outputs = torch.tensor([[PAD, 30, 5, 5, 5], [PAD, 31, 32, 4, 5]])  # encoder-decoder: after the start token
    labels = policy(tokenizer=tokenizer, generation_config=GenerationConfig(eos_token_id=[4, 5]))._as_targets(
        {"input_ids": block["input_ids"], "attention_mask": block["attention_mask"]}, outputs
    )["labels"]  # fmt: skip
    assert labels.tolist() == [[30, 5, -100, -100], [31, 32, 4, -100]]


def bart_with_search_settings() -> torch.nn.Module:
    """A tiny BART whose generation config ships what changes the distribution samples come from (BART-base
    ships num_beams 4 and no_repeat_ngram_size 3), rows past the tokenizer's 36 ids suppressed (a padded
    embedding), and ends at 2."""
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
                        pad_token_id=PAD, bos_token_id=3, eos_token_id=2, decoder_start_token_id=2,
                        forced_eos_token_id=None)  # fmt: skip
    torch.manual_seed(0)
    model = BartForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        num_beams=4, no_repeat_ngram_size=1, repetition_penalty=2.0, min_new_tokens=12, forced_eos_token_id=2,
        forced_bos_token_id=3, top_k=5, eos_token_id=2, pad_token_id=PAD, bos_token_id=3, decoder_start_token_id=2,
        suppress_tokens=[6, *range(36, VOCAB)], max_length=7,
    )  # fmt: skip
    return model


def test_on_policy_samples_are_the_students_ancestral_samples_whatever_its_generation_config_says():
    """The student's generation config asks for beams, n-gram blocking, a repetition penalty, a minimum length,
    a forced end, top-k and a suppressed id: the samples are those of plain sampling at the temperature over the
    tokenizer's vocabulary (the same seed, the same tokens), from the forced first token (mBART's target
    language) on, and the model keeps its config."""
    model = bart_with_search_settings()
    own = model.generation_config.to_dict()
    sampling = policy(tokenizer=Tokenizer(eos=2, size=36), generation_config=model.generation_config,
                      temperature=1.3, max_new_tokens=30)  # fmt: skip
    batch = {"input_ids": torch.randint(7, 36, (8, 6), generator=torch.Generator().manual_seed(1)),
             "attention_mask": torch.ones(8, 6, dtype=torch.long)}  # fmt: skip
    torch.manual_seed(5)
    sampled = sampling.sampled(model, batch, torch.device("cpu"))
    assert model.generation_config.to_dict() == own and not model.training

    plain = GenerationConfig(do_sample=True, temperature=1.3, top_k=0, top_p=1.0, num_beams=1, max_new_tokens=30,
                             eos_token_id=2, pad_token_id=PAD, decoder_start_token_id=2, forced_bos_token_id=3,
                             suppress_tokens=list(range(36, VOCAB)))  # fmt: skip
    model.generation_config = plain
    torch.manual_seed(5)
    expected = model.generate(**batch)
    assert torch.equal(sampled["decoder_input_ids"], expected[:, :-1])
    rows = [row[row != -100].tolist() for row in sampled["labels"]]
    assert all(row[0] == 3 for row in rows) and any(len(set(row)) < len(row) for row in rows)  # no n-gram blocking


@pytest.mark.parametrize(("divergence", "options"), [("jsd", {"beta": 0.3}), ("skew_kl", {"alpha": 0.2})])
def test_the_term_on_sampled_tokens_is_gkds_objective_written_out(divergence, options):
    """GKD's generalised JSD (beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q) and DistiLLM's
    skew KL (KL(p || alpha p + (1 - alpha) q)), per sampled token, averaged over the tokens that count."""
    generator = torch.Generator().manual_seed(0)
    vocabulary = 11
    outputs = torch.tensor([[PAD, 9, 8, EOS, PAD], [PAD, 4, EOS, PAD, PAD]])
    batch = {"input_ids": torch.tensor([[5, EOS], [7, EOS]]), "attention_mask": torch.ones(2, 2, dtype=torch.long)}
    labels = policy()._as_targets(batch, outputs)["labels"]
    student = torch.randn(2, 4, vocabulary, generator=generator, dtype=torch.float64)
    teacher = torch.randn(2, 4, vocabulary, generator=generator, dtype=torch.float64)
    losses, _ = build_losses({"kd": {"divergence": divergence, "temperature": 1.0, **options}}, TEACHER_PRESENT)
    term = losses["kd"]({"logits": student, "labels": labels}, {"logits": teacher})
    expected = []
    for b, t in (labels != -100).nonzero().tolist():
        p, q = F.softmax(teacher[b, t], -1).tolist(), F.softmax(student[b, t], -1).tolist()
        expected.append(reference(divergence, p, q, **options))
    assert len(expected) == 5
    assert term.item() == pytest.approx(sum(expected) / len(expected), rel=1e-9)
    assert math.isfinite(term.item())


def test_on_policy_options_are_checked():
    for bad, message in (({"fraction": 1.5}, "fraction must lie between 0 and 1"),
                         ({"temperature": 0}, "temperature must be positive"),
                         ({"max_new_tokens": 0}, "max_new_tokens must be at least 1")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            build_losses({"kd": {"on_policy": bad}}, TEACHER_PRESENT)


@pytest.fixture(scope="module")
def with_teacher_targets(tiny, tmp_path_factory):
    """The first 8 training pairs with a made-up `teacher_target` each, as generate_targets writes them."""
    path = tmp_path_factory.mktemp("targets") / "train.jsonl"
    with open(tiny_models.SHARED_DATA / "train.jsonl") as source, open(path, "w") as out:
        for index, line in zip(range(8), source):
            out.write(json.dumps({**json.loads(line), "teacher_target": f"Ausgabe Nummer {index}"}) + "\n")
    config = DataConfig(task="translation", dataset="json", source_lang="en", target_lang="de",
                        data_files={"train": str(path), "validation": str(tiny_models.SHARED_DATA / "valid.jsonl")})  # fmt: skip
    return config, tokenizers.load_tokenizer(str(tiny["tokenizer"]))


@pytest.mark.parametrize("targets", ["references", "teacher", "both"])
def test_training_examples_take_the_targets_the_run_asks_for(with_teacher_targets, targets):
    config, tokenizer = with_teacher_targets
    config = dataclasses.replace(config, targets=targets)
    tokenized = data.tokenize(config, tokenizer, data.load_raw(config))
    texts = [tokenizer.decode(row["labels"], skip_special_tokens=True) for row in tokenized["train"]]
    sources = [tokenizer.decode(row["input_ids"], skip_special_tokens=True) for row in tokenized["train"]]
    teacher = [f"Ausgabe Nummer {i}" for i in range(8)]
    if targets == "references":
        assert texts[0].startswith("Es geht nicht an") and len(texts) == 8
    elif targets == "teacher":
        assert texts == teacher
    else:
        assert texts[1::2] == teacher and texts[0].startswith("Es geht nicht an") and sources[0::2] == sources[1::2]
    assert (
        tokenized["validation"][0]["reference"]
        == json.loads(open(config.data_files["validation"]).readline())["translation"]["de"]
    )  # evaluation scores against the references whatever the training targets


def test_teacher_targets_need_the_field_generate_targets_adds(tiny):
    config = DataConfig(task="translation", dataset="json", source_lang="en", target_lang="de", targets="teacher",
                        data_files={"train": str(tiny_models.SHARED_DATA / "valid.jsonl")}, validation_split=None)  # fmt: skip
    tokenizer = tokenizers.load_tokenizer(str(tiny["tokenizer"]))
    with pytest.raises(ConfigError, match="has no field 'teacher_target'"):
        data.tokenize(config, tokenizer, data.load_raw(config))


def test_prompted_decoder_samples_become_right_padded_rows_with_targets_after_the_prompt():
    """Prompts of 2 and 3 tokens, left-padded for generate, each continued up to and with EOS."""
    prompts = [[10, 11], [20, 21, 22]]
    outputs = torch.tensor([[PAD, 10, 11, 40, EOS, PAD], [20, 21, 22, 50, 51, 52]])
    sampled = policy("causal", prompted=True)._as_targets({}, outputs, prompts)
    assert sampled["input_ids"].tolist() == [[10, 11, 40, EOS, PAD, PAD], [20, 21, 22, 50, 51, 52]]
    assert sampled["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]
    assert sampled["labels"].tolist() == [[-100, -100, 40, EOS, -100, -100], [-100, -100, -100, 50, 51, 52]]


@pytest.fixture(scope="module")
def prompted(tiny, tmp_path_factory):
    """English prompts, German completions and made-up teacher continuations, as causal_lm data."""
    path = tmp_path_factory.mktemp("prompted") / "train.jsonl"
    with open(tiny_models.SHARED_DATA / "train.jsonl") as source, open(path, "w") as out:
        for index, line in zip(range(6), source):
            pair = json.loads(line)["translation"]
            out.write(
                json.dumps({"prompt": pair["en"], "text": pair["de"], "teacher_target": f"Ausgabe {index}"}) + "\n"
            )
    config = DataConfig(task="causal_lm", dataset="json", prompt_field="prompt", block_size=512,
                        data_files={"train": str(path)}, validation_split=None)  # fmt: skip
    return config, tokenizers.load_tokenizer(str(tiny["tokenizer"]))


@pytest.mark.parametrize("targets", ["references", "teacher", "both"])
def test_prompted_causal_examples_are_prompt_then_completion_with_targets_on_the_completion(prompted, targets):
    config, tokenizer = prompted
    config = dataclasses.replace(config, targets=targets)
    train = data.tokenize(config, tokenizer, data.load_raw(config))["train"]
    raw = [json.loads(line) for line in open(config.data_files["train"])]
    expected = {"references": [r["text"] for r in raw], "teacher": [r["teacher_target"] for r in raw],
                "both": [t for r in raw for t in (r["text"], r["teacher_target"])]}[targets]  # fmt: skip
    assert len(train) == len(expected)
    for row, completion in zip(train, expected):
        labels = row["labels"]
        start = next(i for i, label in enumerate(labels) if label != -100)
        assert tokenizer.decode(labels[start:], skip_special_tokens=True) == completion
        assert labels[-1] == tokenizer.eos_token_id and row["input_ids"][start:] == labels[start:]
    prompts = [r["prompt"] for r in raw for _ in range(2 if targets == "both" else 1)]
    for row, prompt in zip(train, prompts):
        start = next(i for i, label in enumerate(row["labels"]) if label != -100)
        assert tokenizer.decode(row["input_ids"][:start], skip_special_tokens=True) == prompt
