"""GPU checks: run them when a GPU machine is lent (`python -m pytest -q tests/gpu`); skipped without CUDA."""

import pytest
import torch

from tests.conftest import run_cli, translation_config, write_yaml
from tests.distributed.launch import losses

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def gpu_run(tiny, tmp_path, name: str, teacher_config: str, bf16: bool):
    config = translation_config(
        tiny,
        tmp_path / name,
        teacher={"deepspeed_config": teacher_config},
        student={"deepspeed_config": "ds_configs/student_zero2.json"},
        train={"bf16": bf16, "max_steps": 6, "save_steps": 3},
    )
    result = run_cli("distill", f"--config={write_yaml(tmp_path / f'{name}.yaml', config)}", timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return losses(tmp_path / name)


def test_bf16_runs_track_float32_and_the_teacher_placements_agree(tiny, tmp_path):
    float32 = gpu_run(tiny, tmp_path, "fp32", "ds_configs/teacher_zero3_inference.json", bf16=False)
    bf16 = gpu_run(tiny, tmp_path, "bf16", "ds_configs/teacher_zero3_inference.json", bf16=True)
    replicated = gpu_run(tiny, tmp_path, "replicated", "ds_configs/teacher_replicated_bf16.json", bf16=True)
    assert sorted(bf16) == list(range(1, 7))
    assert bf16 == pytest.approx(float32, rel=3e-2)  # bf16 rounding, not a different computation
    assert replicated == pytest.approx(bf16, rel=1e-3)  # where the teacher lives does not change the numbers
    assert bf16[6] < bf16[1]
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "bf16" / "model").cuda()
    assert model.generate(torch.tensor([[5, 6, 7, 1]], device="cuda"), max_new_tokens=4).shape[1] > 1
