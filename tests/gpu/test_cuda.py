"""GPU checks: run them when a GPU machine is lent (`python -m pytest -q tests/gpu`); skipped without CUDA."""

import pytest
import torch

from tests.conftest import run_cli, translation_config, write_yaml

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_bf16_distillation_with_a_resident_teacher_on_one_gpu(tiny, tmp_path):
    config = translation_config(
        tiny,
        tmp_path / "gpu",
        teacher={"deepspeed_config": "ds_configs/teacher_zero3_inference.json"},
        student={"deepspeed_config": "ds_configs/student_zero3.json"},
        train={"bf16": True, "max_steps": 6, "save_steps": 3},
    )
    path = write_yaml(tmp_path / "gpu.yaml", config)
    result = run_cli("distill", f"--config={path}", timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "gpu" / "model" / "model.safetensors").is_file()
    assert '"peak_memory_gb"' in (tmp_path / "gpu" / "log.jsonl").read_text()
