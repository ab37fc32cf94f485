"""Runs across tokenizers (`losses.kd.cross_tokenizer`), one process each: with one tokenizer the cross-tokenizer
path trains as the same-tokenizer KD term does; students of another tokenizer family (byte-level BPE) learn from
the SentencePiece teachers, seq2seq and decoder-only, and export with their own tokenizer."""

from __future__ import annotations

import pytest
from transformers import AutoConfig, AutoTokenizer

from tests import tiny_models
from tests.conftest import causal_lm_config, run_cli, translation_config, write_yaml
from tests.distributed.launch import losses, training_log

pytestmark = pytest.mark.distributed


def run(tmp_path, name: str, config: dict) -> dict:
    path = write_yaml(tmp_path / f"{name}.yaml", config)
    result = run_cli("distill", f"--config={path}")
    assert result.returncode == 0, result.stderr[-3000:]
    return config


def test_hybrid_with_one_tokenizer_trains_as_the_same_tokenizer_term(tiny, tmp_path):
    same = translation_config(tiny, tmp_path / "same", train={"max_steps": 4, "logging_steps": 1, "save_steps": 0})
    cross = translation_config(tiny, tmp_path / "cross", train={"max_steps": 4, "logging_steps": 1, "save_steps": 0})
    cross["losses"]["kd"]["cross_tokenizer"] = "hybrid"
    run(tmp_path, "same", same)
    run(tmp_path, "cross", cross)
    expected, got = losses(tmp_path / "same"), losses(tmp_path / "cross")
    assert list(got) == [1, 2, 3, 4]
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), step


@pytest.mark.parametrize("kind, task", [("uld", "translation"), ("hybrid", "causal_lm")])
def test_a_student_of_another_tokenizer_family_learns_from_the_teacher(tiny, tmp_path, kind, task):
    """Byte-level BPE students of the SentencePiece teachers: a T5 on translation (uld) and a GPT-2 on packed
    text (hybrid; the teacher reads its own tokens of each student block)."""
    train = {"max_steps": 24, "logging_steps": 4, "save_steps": 0, "learning_rate": 1e-2}
    if task == "translation":
        student = tiny_models.byte_level_t5(tmp_path / "byte_level")
        config = translation_config(tiny, tmp_path / kind, train=train)
    else:
        student = tiny_models.byte_level_gpt2(tmp_path / "byte_level")
        config = causal_lm_config(tiny, tmp_path / kind, train=train)
    # about 32 examples (of text: 11 lines, 30 blocks), one epoch per logging window of 4 steps, so that the
    # windows' KD terms are over about the same examples
    config["data"]["max_train_samples"] = 32 if task == "translation" else 11
    config["student"] = {"model_name_or_path": str(student), "deepspeed_config": "ds_configs/student_zero2.json"}
    config["losses"] = {"kd": {"weight": 1.0, "cross_tokenizer": kind}}
    run(tmp_path, kind, config)
    kd = [row["loss/kd"] for row in training_log(tmp_path / kind) if "loss/kd" in row]
    # a one-block student of a random teacher levels off early (the decoder's at 0.78 of its first window)
    assert len(kd) == 6 and kd[-1] < 0.85 * kd[0], (kind, kd)
    exported = AutoTokenizer.from_pretrained(tmp_path / kind / "model")
    assert exported.get_vocab() == AutoTokenizer.from_pretrained(student).get_vocab()


def test_a_student_cut_with_a_vocabulary_of_its_own_trains_and_exports_it(tiny, tmp_path):
    """student.init.from_teacher.tokenizer on packed text: cut from the GPT-2 teacher (sliced, channels ranked on
    the teacher's own tokens of training blocks), its rows made for the new vocabulary (`make_student
    --tokenizer`), trained across tokenizers; the export reads with the new tokenizer."""
    vocabulary = AutoTokenizer.from_pretrained(tiny_models.byte_level_gpt2(tmp_path / "byte_level"))
    config = causal_lm_config(tiny, tmp_path / "run", train={"max_steps": 4, "save_steps": 0})
    config["student"]["init"]["from_teacher"].update(strategy="sliced", width="importance",
                                                     tokenizer=str(tmp_path / "byte_level"))  # fmt: skip
    config["losses"]["kd"]["cross_tokenizer"] = "hybrid"
    run(tmp_path, "run", config)
    assert "loss/kd" in training_log(tmp_path / "run")[0]
    assert AutoTokenizer.from_pretrained(tmp_path / "run" / "model").get_vocab() == vocabulary.get_vocab()
    student = AutoConfig.from_pretrained(tmp_path / "run" / "model")
    assert student.vocab_size == -(-len(vocabulary) // 64) * 64 and student.n_embd == 32
