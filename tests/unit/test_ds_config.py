"""DeepSpeed JSON: misspelt keys, leftover "auto", the batch-size invariant, filling from the YAML."""

import json

import pytest

from ds_distill.config.deepspeed import fill_auto, load_json
from ds_distill.config.run import TrainConfig
from ds_distill.errors import ConfigError

TRAIN = TrainConfig(per_device_train_batch_size=4, gradient_accumulation_steps=3, learning_rate=1e-4, warmup_steps=5)


def write(tmp_path, config):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize(
    "name",
    [
        "student_zero2",
        "student_zero3",
        "student_zero3_offload",
        "teacher_zero3_inference",
        "teacher_zero3_inference_cpu",
        "teacher_zero3_inference_nvme",
        "teacher_replicated_bf16",
    ],
)
def test_shipped_configs_fill_completely(name):
    config = fill_auto(
        load_json(f"ds_configs/{name}.json"), TRAIN, world_size=2, total_steps=100, on_cpu=True, name=name
    )
    assert config["train_batch_size"] == 4 * 3 * 2
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 3
    assert "auto" not in json.dumps(config)
    if "optimizer" in config:
        assert config["optimizer"]["params"]["lr"] == 1e-4
    if name.startswith("teacher") and config["zero_optimization"]["stage"] == 3:
        assert config["zero_optimization"]["memory_efficient_linear"] is False


def test_torch_adamw_unless_the_optimizer_is_offloaded_fused_on_a_gpu():
    zero2 = fill_auto(load_json("ds_configs/student_zero2.json"), TRAIN, 1, 10, on_cpu=True, name="z2")
    assert zero2["optimizer"]["params"]["torch_adam"] is True
    offload = fill_auto(load_json("ds_configs/student_zero3_offload.json"), TRAIN, 1, 10, on_cpu=True, name="off")
    assert "torch_adam" not in offload["optimizer"]["params"]
    assert "fused" not in zero2["optimizer"]["params"]
    gpu = fill_auto(load_json("ds_configs/student_zero2.json"), TRAIN, 1, 10, on_cpu=False, name="z2")
    assert gpu["optimizer"]["params"]["torch_adam"] is True and gpu["optimizer"]["params"]["fused"] is True


def test_misspelt_top_level_key_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'zero_optimizaton'. Did you mean 'zero_optimization'"):
        load_json(write(tmp_path, {"zero_optimizaton": {"stage": 2}}))


def test_invalid_zero_key_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="invalid zero_optimization"):
        load_json(write(tmp_path, {"zero_optimization": {"stage": 3, "offload_parm": {"device": "cpu"}}}))


def test_leftover_auto_is_refused(tmp_path):
    config = load_json(write(tmp_path, {"fp16": {"enabled": "auto", "loss_scale_window": "auto"}}))
    with pytest.raises(ConfigError, match='"auto" left at fp16.loss_scale_window'):
        fill_auto(config, TRAIN, 1, 10, on_cpu=True, name="x")


def test_broken_batch_size_invariant_is_refused(tmp_path):
    config = load_json(write(tmp_path, {"train_batch_size": 16}))
    with pytest.raises(ConfigError, match="train_batch_size=16 disagrees with the run .*must be 24"):
        fill_auto(config, TRAIN, world_size=2, total_steps=10, on_cpu=True, name="x")


def test_missing_file_is_named():
    with pytest.raises(ConfigError, match="DeepSpeed config ds_configs/nope.json does not exist"):
        load_json("ds_configs/nope.json")


def test_a_deepspeed_scheduler_section_is_refused_for_lr_scheduler_type():
    config = load_json("ds_configs/student_zero2.json")
    config["scheduler"] = {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}
    with pytest.raises(ConfigError, match="remove the scheduler section; .* train.lr_scheduler_type"):
        fill_auto(config, TRAIN, 1, 10, on_cpu=True, name="z2")


@pytest.mark.parametrize("name", ["student_zero2", "student_zero3", "student_zero3_offload"])
def test_shipped_students_accumulate_bf16_gradients_in_fp32(name):
    bf16 = TrainConfig(per_device_train_batch_size=4, gradient_accumulation_steps=3, bf16=True)
    config = fill_auto(load_json(f"ds_configs/{name}.json"), bf16, 2, 100, on_cpu=True, name=name)
    assert config["bf16"]["enabled"] is True
    assert config["data_types"]["grad_accum_dtype"] == "fp32"
    assert config["zero_optimization"]["stage"] in (2, 3)  # where DeepSpeed sums micro-batches in fp32 buffers


def test_fp32_accumulation_of_bf16_gradients_without_zero_is_refused(tmp_path):
    config = load_json(
        write(tmp_path, {"bf16": {"enabled": "auto"}, "data_types": {"grad_accum_dtype": "fp32"}, "optimizer": {}})
    )
    bf16 = TrainConfig(bf16=True)
    with pytest.raises(ConfigError, match="grad_accum_dtype fp32 with bf16 needs ZeRO"):
        fill_auto(config, bf16, 1, 10, on_cpu=True, name="x")
    assert fill_auto(config, TrainConfig(bf16=False), 1, 10, on_cpu=True, name="x")["bf16"]["enabled"] is False
