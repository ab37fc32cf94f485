"""Layer-wise losses in real 2-rank `deepspeed` runs: the teacher under ZeRO-3 inference, students under ZeRO-3
and ZeRO-2.

Tiny T5 pair of different widths and depths (teacher d_model 64, 2+2 blocks; student 32, 1+1), plus GPT-2 and a
bare BERT encoder. Every configured term must reach TensorBoard. The T5 methods are students of the session's
shared cohort run (tests/references.py; test_cohort.py resumes it, projections included), GPT-2 its reference.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import translation_config
from tests.distributed.launch import distill, losses, training_log

pytestmark = pytest.mark.distributed

TERMS = {"b": {"ce", "kd", "cka"}, "miniend_d": {"ce", "kd", "miniend"}, "makd": {"ce", "kd", "makd"},
         "linear": {"ce", "kd", "linear"}}  # fmt: skip
"""Cohort student -> the terms its method brings (b is the CKA preset)."""


def tensorboard_tags(run_dir) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return set(events.Tags()["scalars"])


@pytest.mark.parametrize("student", sorted(TERMS))
def test_every_term_trains_and_reaches_tensorboard(cohort, student):
    run_dir = cohort.dir / student
    rows = [row for row in training_log(run_dir) if "loss" in row]
    assert [row["step"] for row in rows] == list(range(1, 13))
    for term in TERMS[student]:
        assert all(row[f"loss/{term}"] > 0 for row in rows), term
    assert {f"loss/{term}" for term in TERMS[student]} <= tensorboard_tags(run_dir)
    assert (run_dir / "model" / "model.safetensors").is_file()
    assert "expanded from method" in (run_dir / "config.yaml").read_text()


def test_layer_loss_terms_fall_as_the_student_learns(cohort):
    rows = [row for row in training_log(cohort.dir / "makd") if "loss" in row]
    assert rows[-1]["loss/makd"] < rows[0]["loss/makd"]


def test_makd_aligners_train_alike_under_zero2_and_zero3(cohort):
    zero2, zero3 = losses(cohort.dir / "makd_zero2"), losses(cohort.dir / "makd")
    assert sorted(zero2) == list(range(1, 13))
    for step, value in zero2.items():
        assert zero3[step] == pytest.approx(value, rel=1e-5), step


def test_cka_on_a_decoder_only_pair(gpt2_zero3):
    assert {"loss/kd", "loss/cka"} <= tensorboard_tags(gpt2_zero3.dir)
    assert "decoder 0->0, decoder 1->2" in gpt2_zero3.log.read_text()


def test_hidden_states_alone_on_a_bare_bert_encoder(tiny, tmp_path):
    """A sentence-embedding BERT saved as BertModel has no LM head: CKA alone, no masking, an AutoModel export."""
    config = translation_config(
        tiny,
        tmp_path / "bert",
        teacher={"model_name_or_path": str(tiny["bert_bare"])},
        student={
            "init": {"from_teacher": {"encoder_layers": 1, "d_model": 32, "d_ff": 64, "num_heads": 2}},
            "deepspeed_config": "ds_configs/student_zero3.json",
        },
        data={
            "task": "masked_lm",
            "dataset": "text",
            "data_files": tiny["text"],
            "max_source_length": 32,
            "mlm_probability": 0,
        },
        losses={"ce": {"weight": 0}, "kd": {"weight": 0}, "cka": {"weight": 1.0}},  # weight 0: term off
        train={"max_steps": 4, "save_steps": 0},
    )
    run_dir = distill(tmp_path, "bert", config)
    assert {"loss/cka", "eval/loss", "eval/loss/cka"} <= tensorboard_tags(run_dir)
    evaluation = [row for row in training_log(run_dir) if "eval/loss" in row][-1]
    assert 0 < evaluation["eval/loss"] == pytest.approx(evaluation["eval/loss/cka"])
    from transformers import AutoModel

    model = AutoModel.from_pretrained(run_dir / "model")
    assert type(model).__name__ == "BertModel" and model.config.num_hidden_layers == 1
    hidden = model(input_ids=torch.tensor([[5, 6, 7]])).last_hidden_state
    assert hidden.shape == (1, 3, 32)
    assert json.loads((run_dir / "model" / "config.json").read_text())["architectures"] == ["BertModel"]
