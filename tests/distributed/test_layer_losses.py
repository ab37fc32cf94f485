"""Layer-wise losses in real 2-rank `deepspeed` runs: the teacher under ZeRO-3 inference, the student under ZeRO-3.

Tiny T5 pair of different widths and depths (teacher d_model 64, 2+2 blocks; student 32, 1+1), plus GPT-2 and a
bare BERT encoder. Every configured term must reach TensorBoard, and projections must resume exactly.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import causal_lm_config, translation_config
from tests.distributed.launch import distill, distill_until_first_checkpoint, losses, training_log

pytestmark = pytest.mark.distributed

TERMS = {"cka": {"ce", "kd", "cka"}, "miniend_d": {"ce", "kd", "miniend"}, "makd": {"ce", "kd", "makd"}}


def tensorboard_tags(run_dir) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return set(events.Tags()["scalars"])


def method_config(tiny, output_dir, method: str, stage: int = 3, **train) -> dict:
    config = translation_config(
        tiny,
        output_dir,
        student={"deepspeed_config": f"ds_configs/student_zero{stage}.json"},
        train={"max_steps": 6, "save_steps": 0, **train},
    )
    config["method"] = method
    del config["losses"]
    return config


@pytest.fixture(scope="module")
def method_runs(tiny, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("methods")
    return {method: distill(tmp, method, method_config(tiny, tmp / method, method)) for method in TERMS}


@pytest.mark.parametrize("method", sorted(TERMS))
def test_zero3_student_trains_with_every_term_in_tensorboard(method_runs, method):
    run_dir = method_runs[method]
    rows = [row for row in training_log(run_dir) if "loss" in row]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    for term in TERMS[method]:
        assert all(row[f"loss/{term}"] > 0 for row in rows), term
    assert {f"loss/{term}" for term in TERMS[method]} <= tensorboard_tags(run_dir)
    assert (run_dir / "model" / "model.safetensors").is_file()
    assert "expanded from method" in (run_dir / "config.yaml").read_text()


def test_layer_loss_terms_fall_as_the_student_learns(method_runs):
    rows = [row for row in training_log(method_runs["makd"]) if "loss" in row]
    assert rows[-1]["loss/makd"] < rows[0]["loss/makd"]


def test_makd_aligners_train_alike_under_zero2_and_zero3(method_runs, tiny, tmp_path):
    zero2 = distill(tmp_path, "makd2", method_config(tiny, tmp_path / "makd2", "makd", stage=2))
    zero3 = losses(method_runs["makd"])
    for step, value in losses(zero2).items():
        assert zero3[step] == pytest.approx(value, rel=1e-5), step


def checkpoint_state(run_dir) -> dict[str, torch.Tensor]:
    """The fp32 weights of the whole student module (student and loss projections) in the newest checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"))


def test_resume_restores_projection_weights_and_optimizer_state(tiny, tmp_path):
    """Kill -9 a `linear` run after a checkpoint and resume it: losses and projections equal the uninterrupted run."""
    config = method_config(tiny, tmp_path / "whole", "linear", stage=2, max_steps=8, save_steps=3)
    whole = distill(tmp_path, "whole", config)
    config["train"]["output_dir"] = str(tmp_path / "interrupted")
    distill_until_first_checkpoint(tmp_path, "interrupted", config)
    assert 3 <= max(losses(tmp_path / "interrupted")) < 8
    distill(tmp_path, "resumed", config, "--resume")

    assert losses(tmp_path / "interrupted") == pytest.approx(losses(whole), rel=1e-6)
    resumed, reference = checkpoint_state(tmp_path / "interrupted"), checkpoint_state(whole)
    projection = [name for name in reference if name.startswith("losses.linear.")]
    assert projection, sorted(reference)[:5]
    for name in projection:
        torch.testing.assert_close(resumed[name], reference[name], rtol=1e-6, atol=1e-7)
    exported = load_file(whole / "model" / "model.safetensors")
    assert not any("linear" in name or name.startswith("losses.") for name in exported)  # not part of the student


def test_cka_on_a_decoder_only_pair(tiny, tmp_path):
    config = causal_lm_config(tiny, tmp_path / "gpt2", losses={"kd": {"weight": 1.0}, "cka": {"weight": 1.0}})
    run_dir = distill(tmp_path, "gpt2", config)
    assert {"loss/kd", "loss/cka"} <= tensorboard_tags(run_dir)
    assert "decoder 0->0, decoder 1->2" in (tmp_path / "gpt2.log").read_text()


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
