"""HomoDistil scores without gathering: each rank's |w * grad| over its own ZeRO-2 partition, summed over ranks,
equals |w * grad| of the whole fp32 weights and gradients that DeepSpeed gathers (2 CPU ranks, bf16 with fp32
accumulation, a weight split across the two partitions)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed


def test_ranks_parts_of_the_sensitivity_add_up_to_the_gathered_one(tmp_path):
    from tests.distributed.launch import free_port, launch

    command = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(Path(__file__).resolve())]
    launch(command, tmp_path / "ranks.log")
    assert "every weight's parts add up" in (tmp_path / "ranks.log").read_text()


def _on_each_rank() -> None:
    import deepspeed
    import torch
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad
    from transformers import GPT2Config, GPT2LMHeadModel

    from ds_distill import dist
    from ds_distill.config import deepspeed as ds_config
    from ds_distill.config.run import TrainConfig
    from ds_distill.surgery.prune import local_sensitivity

    dist.init()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=16, n_embd=32, n_layer=2, n_head=2))
    train = TrainConfig(per_device_train_batch_size=2, gradient_accumulation_steps=2, bf16=True)
    path = "ds_configs/student_zero2.json"
    config = ds_config.fill_auto(ds_config.load_json(path), train, dist.world_size(), 1, on_cpu=True, name=path)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(dist.rank()))
    for micro in range(2):
        batch = ids[2 * micro : 2 * micro + 2]
        engine.backward(engine(input_ids=batch, labels=batch).loss)
        if micro == 0:
            engine.step()
    split = 0
    for name, parameter in engine.module.named_parameters():
        mine = local_sensitivity(parameter)
        split += 0 < int((mine != 0).sum()) < parameter.numel()
        summed = dist.all_reduce_tensor(mine.clone())
        whole = (safe_get_full_fp32_param(parameter) * safe_get_full_grad(parameter).float()).abs()
        torch.testing.assert_close(summed, whole, rtol=1e-6, atol=0, msg=name)
    assert dist.all_reduce_sum([split])[0] > 0  # some weight lies across both ranks' partitions
    engine.step()
    dist.print_main("every weight's parts add up")
    engine.destroy()
    dist.shutdown()


if __name__ == "__main__":  # each rank, under the launcher
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    _on_each_rank()
