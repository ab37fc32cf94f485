"""The folded LM head under ZeRO-3: DeepSpeed gathers its weight once per forward and once per backward, and
a head of its own is released before the student's blocks run their backward (a tied head is the embedding's
weight too, gathered again for it). One process, every weight partitioned: the persistence threshold at 0, so
the tiny head is not kept whole."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

FAMILIES = ("t5_untied", "gpt2", "bart")  # a head of its own (Flan-T5), one tied to the input embedding, a bias after


def test_zero3_gathers_the_folded_head_once_each_way_and_releases_it(tmp_path):
    from tests.distributed.launch import REPO, subprocess_env

    result = subprocess.run([sys.executable, str(Path(__file__).resolve())], cwd=REPO, env=subprocess_env(),
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert result.stdout.count("head gathered once each way") == len(FAMILIES), result.stdout[-4000:]


def _in_one_process() -> None:
    import collections

    import deepspeed
    import torch
    from deepspeed.runtime.zero import partitioned_param_coordinator as coordinator
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from ds_distill import dist
    from ds_distill.config import deepspeed as ds_config
    from ds_distill.config.run import TrainConfig
    from ds_distill.objectives.layerwise import ModelPair
    from ds_distill.objectives.registry import build_losses
    from ds_distill.train.student import DistillationModule
    from tests.unit.test_capture import tiny_model
    from tests.unit.test_head_fold import family_batch, tiny_model_untied_t5

    dist.init()
    head, untied_blocks, counts = None, set(), collections.Counter()
    fetch = coordinator.PartitionedParameterCoordinator.fetch_sub_module
    release = coordinator.PartitionedParameterCoordinator.release_sub_module

    def counted_fetch(self, module, forward, *args, **kwargs):
        if module is head:
            counts["forward gathers" if forward else "backward gathers"] += 1
        elif not forward and module in untied_blocks and head.weight.ds_status == ZeroParamStatus.AVAILABLE:
            counts["blocks' backward with the head gathered"] += 1
        return fetch(self, module, forward, *args, **kwargs)

    def counted_release(self, module, *args, **kwargs):
        counts["releases"] += module is head
        return release(self, module, *args, **kwargs)

    coordinator.PartitionedParameterCoordinator.fetch_sub_module = counted_fetch
    coordinator.PartitionedParameterCoordinator.release_sub_module = counted_release
    path = "ds_configs/student_zero3.json"
    config = ds_config.fill_auto(ds_config.load_json(path), TrainConfig(per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2), 1, 1, on_cpu=True, name=path)  # fmt: skip
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    for family in FAMILIES:
        model = (tiny_model_untied_t5() if family == "t5_untied" else tiny_model(family)).train()
        losses, weights = build_losses({"ce": {}}, model_pair=ModelPair(model.config, model.config))
        module = DistillationModule(model, losses, weights)
        head = model.get_output_embeddings()
        # a head tied to the input embedding is gathered again (or prefetched) for the embedding's backward
        untied = head.weight is not model.get_input_embeddings().weight
        stacks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)] if untied else []
        untied_blocks = {block for stack in stacks for block in stack}
        engine, *_ = deepspeed.initialize(model=module, model_parameters=module.parameters(), config=config)
        batch = family_batch(module)
        for micro_step in range(4):  # two optimizer steps of two micro-steps
            counts.clear()
            total, _ = engine(batch)
            engine.backward(total)
            engine.step()
            expected = {"forward gathers": 1, "backward gathers": 1, "releases": 2}
            assert dict(counts) == expected, (family, micro_step, dict(counts))
            assert head.ds_grads_remaining == 0, (family, micro_step, head.ds_grads_remaining)
            assert head.weight.ds_status == ZeroParamStatus.NOT_AVAILABLE, (family, micro_step)
        print(f"{family}: head gathered once each way, released before the blocks' backward", flush=True)
        engine.destroy()
    dist.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    _in_one_process()
