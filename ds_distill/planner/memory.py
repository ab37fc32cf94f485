"""What each part of a run holds, per GPU and per node, for one placement of the teacher and one of the student:
teacher weights, student states (DeepSpeed's own estimators), and the layer-wise losses' teacher features."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ds_distill import models
from ds_distill.config import deepspeed as ds_config
from ds_distill.errors import ConfigError
from ds_distill.planner.trace import StepShape

GB = 2**30  # as the run logs peak_memory_gb
GPU_RESERVE_GB = 1.0  # CUDA context, communication buffers
GPU_SLACK = 0.05  # the caching allocator's fragmentation: allocated memory that cannot be handed out again
HOST_SLACK = 0.10  # the operating system, the data pipeline, page cache
PREFETCH_DEFAULT = 5e7  # DeepSpeed's stage3_prefetch_bucket_size default
PERSISTENCE_THRESHOLD = 1e4  # stage3_param_persistence_threshold in ds_configs/: smaller tensors stay whole


@dataclass(frozen=True)
class Hardware:
    gpus_per_node: int
    nodes: int
    gpu_memory_gb: float
    cpu_memory_gb: float

    def __post_init__(self):
        for name in ("gpus_per_node", "nodes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be a whole number of at least 1, got {getattr(self, name)!r}")
        for name in ("gpu_memory_gb", "cpu_memory_gb"):
            if not isinstance(getattr(self, name), int | float) or getattr(self, name) <= 0:
                raise ConfigError(f"--{name} must be a positive number of GB, got {getattr(self, name)!r}")

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def usable_gpu(self) -> float:
        return (self.gpu_memory_gb * (1 - GPU_SLACK) - GPU_RESERVE_GB) * GB

    @property
    def usable_host(self) -> float:
        return self.cpu_memory_gb * (1 - HOST_SLACK) * GB


# ---------------------------------------------------------------------------------------------------------
# Weights: parameters on the meta device


@dataclass(frozen=True)
class ModelSize:
    params: int
    largest_module: int  # parameters of the largest single module (what ZeRO-3 gathers at once)
    small: int  # parameters in tensors at or below the persistence threshold (kept whole by ZeRO-3)

    @classmethod
    def of(cls, config, threshold: float = PERSISTENCE_THRESHOLD) -> ModelSize:
        with torch.device("meta"):
            model = models.adapter_for(config).from_config(config)
        largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
        params = list(model.parameters())
        small = sum(p.numel() for p in params if p.numel() <= threshold)
        return cls(sum(p.numel() for p in params), largest, small)


# ---------------------------------------------------------------------------------------------------------
# Placements


@dataclass(frozen=True)
class Placement:
    """One DeepSpeed config for a role, read the way DeepSpeed will read it."""

    path: str
    kind: str  # teacher: replicated | zero3 | cpu | nvme; student: zero2 | zero2_offload | zero3 | zero3_offload
    settings: dict[str, Any]

    @classmethod
    def read(cls, path: str, role: str, bf16: bool) -> Placement:
        settings = ds_config.load_json(path)
        stage = ds_config.zero_stage(settings)
        zero = settings.get("zero_optimization", {})
        param = (zero.get("offload_param") or {}).get("device", "none")
        optimizer = (zero.get("offload_optimizer") or {}).get("device", "none")
        if role == "teacher":
            kind = "replicated" if stage < 3 else {"cpu": "cpu", "nvme": "nvme"}.get(param, "zero3")
        else:
            kind = ("zero3" if stage == 3 else "zero2") + ("_offload" if optimizer != "none" else "")
        enabled = settings.get("bf16", {}).get("enabled", False)
        settings = {**settings, "bf16": {"enabled": bf16 if enabled == "auto" else bool(enabled)}}
        return cls(path, kind, settings)

    @property
    def name(self) -> str:
        return Path(self.path).name

    @property
    def weight_bytes(self) -> int:
        return 2 if self.settings["bf16"]["enabled"] else 4

    def zero(self, key: str, default: float) -> float:
        return float(self.settings.get("zero_optimization", {}).get(key, default))


@dataclass
class Cost:
    """Bytes per GPU and per node's host memory, by part."""

    gpu: dict[str, float]
    host: dict[str, float]
    nvme: float = 0.0


def teacher_cost(place: Placement, size: ModelSize, hw: Hardware) -> Cost:
    width = place.weight_bytes
    whole = size.params * width
    if place.kind == "replicated":  # each rank loads it in host memory first, then moves it to its GPU
        return Cost({"teacher": whole}, {"teacher (while loading)": whole * hw.gpus_per_node})
    prefetch = place.zero("stage3_prefetch_bucket_size", PREFETCH_DEFAULT)
    gathered = width * min(size.params, size.largest_module + prefetch + size.small)
    partition = whole / hw.world
    if place.kind == "zero3":
        return Cost({"teacher": partition + gathered}, {})
    if place.kind == "cpu":
        return Cost({"teacher": gathered}, {"teacher (offloaded)": partition * hw.gpus_per_node})
    aio = place.settings["zero_optimization"]["offload_param"]
    buffers = float(aio.get("buffer_count", 5)) * float(aio.get("buffer_size", 1e8)) * width
    return Cost({"teacher": gathered}, {"teacher (NVMe buffers)": buffers * hw.gpus_per_node},
                nvme=partition * hw.gpus_per_node)  # fmt: skip


def student_cost(place: Placement, size: ModelSize, hw: Hardware, loads_partitioned: bool, gpu: bool) -> Cost:
    """DeepSpeed's estimators assume 16-bit weights with float32 master weights; an fp32 run holds 4-byte
    weights and gradients instead of 2-byte ones. Added: the buckets gradients are reduced through
    (`reduce_bucket_size` elements, two of them with `overlap_comm`), whole on a GPU; in host memory only the
    pages gradients are written to become resident."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    params, world, fp32 = size.params, hw.world, place.weight_bytes == 4
    zero = place.settings.get("zero_optimization", {})
    offload_optimizer = (zero.get("offload_optimizer") or {}).get("device", "none") != "none"
    if place.kind.startswith("zero2"):
        host, device = estimate_zero2_model_states_mem_needs(
            params, hw.gpus_per_node, hw.nodes, cpu_offload=offload_optimizer
        )
        device += (2 * params + (0 if offload_optimizer else 2 * params / world)) if fp32 else 0
    else:
        offload_param = (zero.get("offload_param") or {}).get("device", "none") != "none"
        host, device, _ = estimate_zero3_model_states_mem_needs(
            params, size.largest_module, hw.gpus_per_node, hw.nodes, cpu_offload=offload_optimizer,
            cpu_offload_params=offload_param, zero_init=loads_partitioned,
        )  # fmt: skip
        device += (4 * params / world if not offload_optimizer else 0) if fp32 else 0
    bucket = place.zero("reduce_bucket_size", 5e8)
    buckets = 2 if zero.get("overlap_comm") else 1
    device += buckets * place.weight_bytes * (bucket if gpu else min(bucket, params))
    return Cost({"student states": device}, {"student states": host})


# ---------------------------------------------------------------------------------------------------------
# Captured features of layer-wise losses


def feature_bytes(losses: dict, pair, shape: StepShape, teacher_bytes: int) -> float:
    """Per example: the teacher's features that layer-wise losses read, held from the teacher's forward through
    the student's (and so through the logit losses' peak). The float32 copies the layer-wise losses make come
    after that peak, while the logit losses' temporaries are gone, and are not added (on one H100, CKA on 26
    layer pairs raised the peak by 4.1 GB where its captured features hold 4.4 GB: bench/RESULTS.md)."""
    from ds_distill.objectives.capture import parse_key

    _, teacher_adapter = pair.adapters()
    keys = set().union(*(loss.teacher_keys for loss in losses.values()))
    total = 0
    for key in keys:
        stack, _, site = parse_key(key)
        tokens = shape.target if (stack == "decoder" and shape.target) else shape.source
        total += tokens * _site_width(teacher_adapter, pair.teacher, site, tokens) * teacher_bytes
    return total


def _site_width(adapter: models.ModelAdapter, config, site: str, tokens: int) -> int:
    """Values per token a feature site holds."""
    if site == "attention_probs":
        return adapter.num_heads(config) * tokens
    if site.endswith("_q"):
        return adapter.attention_widths(config)[0]
    if site.endswith(("_k", "_v")):
        return adapter.attention_widths(config)[1]
    if site == "ffn_intermediate":
        return getattr(config, adapter.config_fields["d_ff"][0])
    return adapter.width(config)
