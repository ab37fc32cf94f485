"""Plain DeepSpeed JSON in, checked and completed DeepSpeed dicts out.

The JSON files in `ds_configs/` stay plain DeepSpeed JSON. Where they say "auto", the value comes from the
run's YAML (`train.*`); what is left "auto" afterwards is an error, and so is a misspelt top-level key, which
DeepSpeed itself would silently ignore (`zero_optimizaton` trains without ZeRO).
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Any

import torch

from ds_distill.config.paths import PROJECT_ROOT
from ds_distill.config.run import LR_SCHEDULERS, TrainConfig
from ds_distill.config.typed import unknown_key_error
from ds_distill.errors import ConfigError

# Top-level keys DeepSpeed reads (runtime/config.py and the feature configs it hands sections to).
KNOWN_TOP_LEVEL_KEYS = sorted(
    """
    activation_checkpointing aio amp autotuning bf16 checkpoint comet comms_logger communication_data_type compile
    compression_training csv_monitor curriculum_learning data_efficiency data_types dataloader_drop_last
    disable_allgather dump_state elasticity expert_parallel flops_profiler fp16 gradient_accumulation_steps
    gradient_allreduce_op gradient_clipping gradient_predivide_factor hybrid_engine log_level
    managed_gradient_accumulation memory_breakdown monitor_config nebula optimizer pipeline prescale_gradients
    scheduler seq_parallel_communication_data_type sparse_attention sparse_gradients steps_per_print tensorboard
    timers torch_autocast train_batch_size train_micro_batch_size_per_gpu use_data_before_expert_parallelism
    vocabulary_size wall_clock_breakdown wandb weight_quantization zero_allow_untested_optimizer
    zero_force_ds_cpu_optimizer zero_optimization
    """.split()
)


# Where the teacher lives, by the name the launch scripts take (TEACHER=...); their bash side says the same.
TEACHER_PLACEMENTS = {
    "replicated": "ds_configs/teacher_replicated_bf16.json",
    "zero3": "ds_configs/teacher_zero3_inference.json",
    "cpu": "ds_configs/teacher_zero3_inference_cpu.json",
    "nvme": "ds_configs/teacher_zero3_inference_nvme.json",
}


def resolve_path(path: str) -> Path:
    """A config path as given, else relative to the project root (so recipes work from any directory)."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    if not candidate.is_absolute() and (PROJECT_ROOT / candidate).is_file():
        return PROJECT_ROOT / candidate
    raise ConfigError(f"DeepSpeed config {path} does not exist (looked in the working directory and {PROJECT_ROOT})")


def load_json(path: str) -> dict[str, Any]:
    resolved = resolve_path(path)
    try:
        config = json.loads(resolved.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{resolved} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{resolved} must hold a JSON object of DeepSpeed settings")
    check_keys(config, str(resolved))
    return config


def check_keys(config: dict[str, Any], name: str) -> None:
    """Rejects misspelt top-level keys and invalid `zero_optimization` entries before DeepSpeed sees them."""
    for key in config:
        if key not in KNOWN_TOP_LEVEL_KEYS:
            error = unknown_key_error(key, KNOWN_TOP_LEVEL_KEYS, "")
            raise ConfigError(f"{name}: {error} (DeepSpeed would silently ignore it)")
    zero = config.get("zero_optimization")
    if zero is not None:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

        try:
            DeepSpeedZeroConfig(**zero)
        except Exception as error:  # pydantic's ValidationError; its message names the bad field
            first_line = str(error).splitlines()
            raise ConfigError(f"{name}: invalid zero_optimization: {' '.join(first_line[:3])}") from None


def zero_stage(config: dict[str, Any]) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


@contextlib.contextmanager
def zero3_loading(ds_config: dict[str, Any]):
    """While open, `from_pretrained`/`from_config` build ZeRO-3-partitioned models.

    The Hugging Face switch is process-wide, so it is closed again before anything else is built (a ZeRO-2
    student built while it is on crashes with "'weight' must be 2-D").
    """
    if zero_stage(ds_config) != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    switch = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        del switch
        unset_hf_deepspeed_config()


def model_dtype(ds_config: dict[str, Any]) -> torch.dtype:
    return torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32


def _fill(section: dict[str, Any], key: str, value: Any) -> None:
    if section.get(key) == "auto":
        section[key] = value


def fill_auto(
    config: dict[str, Any], train: TrainConfig, world_size: int, total_steps: int, on_cpu: bool, name: str
) -> dict[str, Any]:
    """Returns a copy of `config` with every documented "auto" taken from `train`, checked for leftovers.

    Batch sizes are always set from the YAML, so one JSON serves any number of ranks; an explicit value that
    disagrees with `train` is an error rather than a silent second source of truth.
    """
    config = copy.deepcopy(config)
    micro, accumulation = train.per_device_train_batch_size, train.gradient_accumulation_steps
    expected = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro * accumulation * world_size,
    }
    for key, value in expected.items():
        given = config.get(key, "auto")
        if given != "auto" and not (isinstance(given, int | float) and given == value):
            raise ConfigError(
                f"{name}: {key}={given} disagrees with the run ({key} must be {value}: train_batch_size = "
                f"per_device_train_batch_size {micro} x gradient_accumulation_steps {accumulation} x world size "
                f'{world_size}). Set it to "auto" or change train.*'
            )
        config[key] = value
    _fill(config, "gradient_clipping", train.max_grad_norm)
    for precision, enabled in (("bf16", train.bf16), ("fp16", False)):
        if precision in config:
            _fill(config[precision], "enabled", enabled)

    optimizer = config.get("optimizer")
    if optimizer is not None:
        params = optimizer.setdefault("params", {})
        _fill(params, "lr", train.learning_rate)
        _fill(params, "betas", [train.adam_beta1, train.adam_beta2])
        _fill(params, "eps", train.adam_epsilon)
        _fill(params, "weight_decay", train.weight_decay)
        offloaded = config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none"
        if not offloaded and optimizer.get("type", "").lower() in ("adam", "adamw"):
            # torch's AdamW (fused on a GPU) does the job of DeepSpeed's FusedAdam without building it at start:
            # DeepSpeed's build is a GPU kernel only, and it fails where TORCH_CUDA_ARCH_LIST names an arch
            # such as 9.0a (seen on an H100 machine with DeepSpeed 0.19.8).
            params.setdefault("torch_adam", True)
            if not on_cpu:
                params.setdefault("fused", True)
    _check_grad_accum_dtype(config, name)
    if "scheduler" in config:
        raise ConfigError(
            f"{name}: remove the scheduler section; the learning-rate schedule comes from train.lr_scheduler_type "
            f"({', '.join(LR_SCHEDULERS)}) and train.warmup_steps, with Hugging Face's meaning"
        )

    leftovers = list(_auto_keys(config))
    if leftovers:
        raise ConfigError(
            f'{name}: "auto" left at {", ".join(leftovers)}; ds_distill fills only documented keys, set these'
        )
    return config


def _check_grad_accum_dtype(config: dict[str, Any], name: str) -> None:
    """bf16 weights with fp32 gradient accumulation (`data_types.grad_accum_dtype`) need a ZeRO optimizer:
    ZeRO-2 and ZeRO-3 sum the micro-batches' gradients in fp32 buffers, and without ZeRO DeepSpeed refuses the
    mix, but only once the weights are loaded."""
    accumulation = config.get("data_types", {}).get("grad_accum_dtype")
    bf16 = config.get("bf16", {}).get("enabled") is True
    if bf16 and accumulation == "fp32" and "optimizer" in config and zero_stage(config) == 0:
        raise ConfigError(
            f"{name}: data_types.grad_accum_dtype fp32 with bf16 needs ZeRO (DeepSpeed refuses it without); set "
            "zero_optimization.stage to 2 or 3, or remove data_types to accumulate in bf16"
        )


def _auto_keys(node: Any, prefix: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _auto_keys(value, f"{prefix}{key}.")
    elif node == "auto":
        yield prefix.rstrip(".")
