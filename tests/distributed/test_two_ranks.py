"""Real `deepspeed` launches with 2 CPU ranks on tiny models: parity, resume, export, three model families.

Each run trains a student under its own ZeRO-2 or ZeRO-3 engine beside a teacher under ZeRO-3 inference with
CPU offload, on the shared WMT sample with a sentencepiece tokenizer trained by the fixtures.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import causal_lm_config, run_cli, translation_config, write_yaml
from tests.distributed.launch import (
    distill,
    distill_until_first_checkpoint,
    free_port,
    launch,
    losses,
    training_log,
)

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """The same distillation with the student under ZeRO-2 and under ZeRO-3."""
    tmp = tmp_path_factory.mktemp("runs")
    out = {}
    for stage in (2, 3):
        config = translation_config(
            tiny,
            tmp / f"zero{stage}",
            student={"deepspeed_config": f"ds_configs/student_zero{stage}.json"},
            train={"eval_metric": "bleu", "generation_max_length": 16},
        )
        out[stage] = (distill(tmp, f"zero{stage}", config), config)
    return out


def test_zero2_and_zero3_students_give_the_same_losses(runs):
    zero2, zero3 = losses(runs[2][0]), losses(runs[3][0])
    assert sorted(zero2) == list(range(1, 13))
    for step in zero2:
        assert zero3[step] == pytest.approx(zero2[step], rel=1e-5), step
    assert zero2[12] < zero2[1]  # it learns
    eval2 = [row for row in training_log(runs[2][0]) if "eval/loss" in row][-1]
    eval3 = [row for row in training_log(runs[3][0]) if "eval/loss" in row][-1]
    assert eval3["eval/loss"] == pytest.approx(eval2["eval/loss"], rel=1e-5)
    assert "eval/bleu" in eval2


def test_every_term_reaches_tensorboard(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(runs[2][0] / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "loss/ce", "loss/kd", "lr", "tokens_per_s", "peak_memory_gb", "eval/loss"} <= tags


@pytest.mark.parametrize("stage", [2, 3])
def test_exported_student_loads_and_generates(runs, stage):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model_dir = runs[stage][0] / "model"
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= set(
        os.listdir(model_dir)
    )
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert model.config.d_model == 32 and model.config.num_layers == 1
    inputs = tokenizer(["translate English to German: The house is small."], return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=8)
    assert generated.shape[0] == 1 and generated.shape[1] > 1


def test_zero2_and_zero3_exports_hold_the_same_weights(runs):
    zero2 = load_file(runs[2][0] / "model" / "model.safetensors")
    zero3 = load_file(runs[3][0] / "model" / "model.safetensors")
    assert zero2.keys() == zero3.keys()
    for name in zero2:
        torch.testing.assert_close(zero3[name], zero2[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stage", [2, 3])
def test_export_verb_turns_the_checkpoint_into_the_same_model(runs, stage, tmp_path):
    run_dir = runs[stage][0]
    result = run_cli("export", f"--checkpoint_dir={run_dir / 'checkpoints'}", f"--output_dir={tmp_path / 'exported'}")
    assert result.returncode == 0, result.stderr[-3000:]
    final = load_file(run_dir / "model" / "model.safetensors")
    exported = load_file(tmp_path / "exported" / "model.safetensors")
    for name in final:
        torch.testing.assert_close(exported[name], final[name])


def test_killed_run_resumes_to_the_uninterrupted_result(runs, tmp_path):
    """Kill -9 a run after its first checkpoint, resume it, and compare with the uninterrupted ZeRO-2 run."""
    reference_dir, reference_config = runs[2]
    config = json.loads(json.dumps(reference_config))
    config["train"]["output_dir"] = str(tmp_path / "interrupted")
    distill_until_first_checkpoint(tmp_path, "interrupted", config)
    killed_at = max(losses(tmp_path / "interrupted"), default=0)
    assert 4 <= killed_at < 12

    distill(tmp_path, "resumed", config, "--resume")
    assert losses(tmp_path / "interrupted") == pytest.approx(losses(reference_dir), rel=1e-6)
    resumed = load_file(tmp_path / "interrupted" / "model" / "model.safetensors")
    reference = load_file(reference_dir / "model" / "model.safetensors")
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], rtol=1e-6, atol=1e-7)


def test_same_output_dir_without_resume_or_overwrite_is_refused(runs, tmp_path):
    path = write_yaml(tmp_path / "again.yaml", runs[2][1])
    result = run_cli("distill", f"--config={path}")
    assert result.returncode == 2
    assert "already holds this run's checkpoints; pass --resume" in result.stderr


def test_decoder_only_family_under_torchrun(tiny, tmp_path):
    config = causal_lm_config(
        tiny, tmp_path / "gpt2", losses={"ce": {"weight": 1.0}, "kd": {"weight": 1.0, "divergence": "reverse_kl"}}
    )
    path = write_yaml(tmp_path / "gpt2.yaml", config)
    launch(
        [
            "torchrun",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            "-m",
            "ds_distill",
            "distill",
            f"--config={path}",
        ],
        tmp_path / "gpt2.log",
    )
    assert sorted(losses(tmp_path / "gpt2")) == [1, 2, 3, 4]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2" / "model")
    assert model.config.n_layer == 1 and model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3).shape == (1, 6)


def test_encoder_only_family(tiny, tmp_path):
    config = translation_config(
        tiny,
        tmp_path / "bert",
        teacher={"model_name_or_path": str(tiny["bert"])},
        student={"init": {"from_teacher": {"encoder_layers": 1, "d_model": 32, "d_ff": 64, "num_heads": 2}}},
        data={"task": "masked_lm", "dataset": "text", "data_files": tiny["text"], "max_source_length": 32},
        losses={"ce": {"weight": 1.0}, "kd": {"weight": 1.0, "divergence": "jsd", "beta": 0.5}},
        train={"max_steps": 4, "save_steps": 0},
    )
    run_dir = distill(tmp_path, "bert", config)
    assert sorted(losses(run_dir)) == [1, 2, 3, 4]
    assert [row for row in training_log(run_dir) if "eval/loss" in row]
    from transformers import AutoModelForMaskedLM

    assert AutoModelForMaskedLM.from_pretrained(run_dir / "model").config.num_hidden_layers == 1
