"""Every token of an optimizer step weighs alike, however the step's samples fall into micro-batches and ranks.

The same 8 samples as one micro-batch of 8, as 2 micro-batches of 4 with accumulation, and as 2 ranks with 4
each: the step's loss and the update it makes are the same, for ce, kd and a layer-wise term. The samples
are real sentences of different lengths, so the micro-batches hold different numbers of tokens; dropout is
off, and Adam's epsilon is large enough that the update follows the gradient's size, not only its sign.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, T5Config

from ds_distill.config.run import RunConfig
from ds_distill.config.typed import from_dict
from ds_distill.models import adapter_for
from ds_distill.train.student import build_student, student_hf_config
from tests.conftest import run_cli, translation_config, write_yaml
from tests.distributed.launch import distill, losses

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def teacher_without_dropout(tiny, tmp_path_factory):
    """The tiny T5 teacher with dropout 0 (a student built from it inherits that)."""
    path = tmp_path_factory.mktemp("teacher") / "t5"
    config = T5Config.from_pretrained(tiny["t5"])
    config.dropout_rate = 0.0
    torch.manual_seed(0)
    adapter_for(config).from_config(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny["t5"]).save_pretrained(path)
    return path


def split_config(tiny, teacher, output_dir, micro_batch: int, accumulation: int) -> dict:
    return translation_config(
        tiny,
        output_dir,
        teacher={"model_name_or_path": str(teacher)},
        data={"validation_split": None, "max_train_samples": 64},
        losses={"ce": {}, "kd": {"temperature": 2.0}, "linear": {}},
        train={
            "max_steps": 1,
            "save_steps": 0,
            "per_device_train_batch_size": micro_batch,
            "gradient_accumulation_steps": accumulation,
            "learning_rate": 0.05,
            "warmup_steps": 0,
            "lr_scheduler_type": "constant",
            "adam_epsilon": 1.0,
            "max_grad_norm": 1e9,
            "group_by_length": False,  # the same 8 samples in the step, however it is split
        },
    )


def update(run_dir, initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    exported = load_file(run_dir / "model" / "model.safetensors")
    return {name: exported[name] - initial[name] for name in exported}


def test_a_step_is_the_same_however_its_samples_are_split(tiny, teacher_without_dropout, tmp_path):
    configs = {
        "1 x 8": split_config(tiny, teacher_without_dropout, tmp_path / "one", 8, 1),
        "2 x 4 accumulated": split_config(tiny, teacher_without_dropout, tmp_path / "accumulated", 4, 2),
        "2 ranks x 4": split_config(tiny, teacher_without_dropout, tmp_path / "ranks", 4, 1),
    }
    for name in ("1 x 8", "2 x 4 accumulated"):
        path = write_yaml(tmp_path / f"{name[:1]}.yaml", configs[name])
        result = run_cli("distill", f"--config={path}")
        assert result.returncode == 0, result.stderr[-3000:]
    distill(tmp_path, "ranks", configs["2 ranks x 4"])

    run = from_dict(RunConfig, configs["1 x 8"])
    student_config = student_hf_config(run.student, T5Config.from_pretrained(run.teacher.model_name_or_path))
    student = build_student(run.student, student_config, {}, run.train.seed)  # the weights every run starts from
    initial = {name: tensor.detach() for name, tensor in student.state_dict().items()}
    reference_loss = losses(tmp_path / "one")[1]
    reference_update = update(tmp_path / "one", initial)
    assert sum(delta.norm() for delta in reference_update.values()) > 1e-2  # the step moved the weights
    for name in ("2 x 4 accumulated", "2 ranks x 4"):
        run_dir = tmp_path / ("accumulated" if "accumulated" in name else "ranks")
        assert losses(run_dir)[1] == pytest.approx(reference_loss, rel=1e-5), name
        for tensor_name, delta in update(run_dir, initial).items():
            expected = reference_update[tensor_name]
            difference = (delta - expected).norm() / expected.norm().clamp_min(1e-12)
            assert difference < 1e-4, (name, tensor_name, float(difference))
