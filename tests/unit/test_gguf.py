"""GGUF teachers: tools/gguf_to_hf.py on the real SmolLM2-135M file, and teacher.gguf_file's conversion cache."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ds_distill.config.run import TeacherConfig
from ds_distill.errors import ConfigError
from ds_distill.models import gguf
from tests import real_models

SENTENCES = [
    "The committee will meet again next week to discuss the budget for the coming year.",
    "She opened the window because the room was too warm and the air smelled of paint.",
]


def perplexity(model, tokenizer, texts: list[str]) -> float:
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        return float(torch.exp(model(**batch, labels=labels).loss))


def test_converted_smollm2_equals_transformers_gguf_reader_and_is_a_real_model(smollm2):
    source = real_models.smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert len(tokenizer) == 49152 and model.dtype == torch.float32

    reference = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name).eval()
    ids = tokenizer(SENTENCES[0], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, reference(**ids).logits, rtol=1e-5, atol=1e-5)
    assert tokenizer.tokenize(SENTENCES[1]) == AutoTokenizer.from_pretrained(
        source.parent, gguf_file=source.name
    ).tokenize(SENTENCES[1])

    tokenizer.pad_token = tokenizer.eos_token
    shuffled = []
    for text in SENTENCES:
        words = text.split()
        random.Random(0).shuffle(words)
        shuffled.append(" ".join(words))
    natural, scrambled = perplexity(model, tokenizer, SENTENCES), perplexity(model, tokenizer, shuffled)
    assert natural < 150 and scrambled > 5 * natural, (natural, scrambled)


def test_teacher_gguf_file_converts_once_per_machine(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "tiny.gguf").write_bytes(b"GGUF")
    calls = []

    def fake_convert(directory, gguf_file, output_dir, dtype=torch.float32):
        calls.append((directory, gguf_file))
        output_dir.mkdir()
        (output_dir / "config.json").write_text("{}")

    monkeypatch.setattr(gguf, "convert", fake_convert)
    monkeypatch.setenv("DS_DISTILL_CACHE", str(tmp_path / "cache"))
    teacher = TeacherConfig(model_name_or_path=str(tmp_path / "model"), gguf_file="tiny.gguf")
    first, second = gguf.teacher_weights(teacher), gguf.teacher_weights(teacher)
    assert first == second and first.startswith(str(tmp_path / "cache" / "gguf" / "tiny-"))
    assert calls == [(str(tmp_path / "model"), "tiny.gguf")]

    with pytest.raises(ConfigError, match="missing.gguf is not in"):
        gguf.teacher_weights(TeacherConfig(model_name_or_path=str(tmp_path / "model"), gguf_file="missing.gguf"))


def test_a_file_that_is_not_gguf_is_refused_with_its_name(tmp_path):
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(ConfigError, match="cannot read broken.gguf"):
        gguf.convert(str(tmp_path), "broken.gguf", tmp_path / "out")
