"""A student's own vocabulary: `ds-distill train_tokenizer` learns one of the teacher's kind from the run's text."""

from __future__ import annotations

from transformers import AutoTokenizer

from tests.conftest import run_verb, translation_config, write_yaml


def test_train_tokenizer_learns_a_vocabulary_of_the_teachers_kind_from_the_runs_text(tiny, tmp_path):
    config = write_yaml(tmp_path / "run.yaml", translation_config(tiny, tmp_path / "run"))
    result = run_verb("train_tokenizer", f"--config={config}", "--vocab_size=300", f"--output_dir={tmp_path / 'tok'}")
    assert result.returncode == 0, result.stderr
    teacher, trained = AutoTokenizer.from_pretrained(tiny["t5"]), AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert 250 <= len(trained) <= 300 < len(teacher)
    assert type(trained.backend_tokenizer.model) is type(teacher.backend_tokenizer.model)  # unigram, as the teacher
    assert repr(trained.backend_tokenizer.pre_tokenizer) == repr(teacher.backend_tokenizer.pre_tokenizer)
    assert (trained.pad_token, trained.eos_token, trained.unk_token) == (teacher.pad_token, teacher.eos_token,
                                                                           teacher.unk_token)  # fmt: skip
    text = "Die Kommission hat heute einen Vorschlag angenommen."  # German and English are both learnt
    assert trained.unk_token_id not in trained(text)["input_ids"]
    assert trained.decode(trained(text)["input_ids"], skip_special_tokens=True) == text
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith(f"{tmp_path / 'tok'}: {len(trained)} tokens, ")

    again = run_verb("train_tokenizer", f"--config={config}", f"--output_dir={tmp_path / 'tok'}")
    assert again.returncode == 2 and "holds a tokenizer already; pass --overwrite" in again.stderr
