"""The teacher under ZeRO-3 inference (partitioned while it loads, offloaded to CPU) computes what the plain
Hugging Face model computes: same logits, a separate Flan-T5-style LM head kept separate, nothing trainable."""

import pytest
import torch

from ds_distill import dist, models
from ds_distill.config import deepspeed as ds_config
from ds_distill.config.run import TrainConfig
from ds_distill.train.teacher import load_teacher


@pytest.mark.parametrize("family", ["t5", "gpt2", "bert"])
def test_zero3_teacher_matches_the_plain_model(tiny, family):
    dist.init()
    config = ds_config.fill_auto(
        ds_config.load_json("ds_configs/teacher_zero3_inference_cpu.json"),
        TrainConfig(per_device_train_batch_size=2),
        world_size=1,
        total_steps=1,
        on_cpu=True,
        name="teacher",
    )
    teacher = load_teacher(str(tiny[family]), config)
    plain = models.adapter_for(models.load_config(str(tiny[family]), "teacher")).from_pretrained(str(tiny[family]))
    plain.eval()
    assert not any(p.requires_grad for p in teacher.module.parameters())
    assert all(p.numel() == 0 for p in teacher.module.parameters())  # partitioned: no full weights outside forward
    inputs = {
        "input_ids": torch.tensor([[5, 17, 42, 9, 1], [8, 3, 77, 1, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]),
    }
    if family == "t5":
        inputs["decoder_input_ids"] = torch.tensor([[0, 11, 12], [0, 13, 14]])
        assert plain.lm_head.weight is not plain.shared.weight
        assert not torch.equal(plain.lm_head.weight, plain.shared.weight)
    with torch.no_grad():
        torch.testing.assert_close(teacher(**inputs).logits, plain(**inputs).logits, rtol=1e-5, atol=1e-5)
