"""`ds-distill plan`: memory per rank for every placement of the teacher and the student, before a launch.

    ds-distill plan --recipe=flan_t5_3b_145m --gpus_per_node=8 --gpu_memory_gb=80 --cpu_memory_gb=1000
    ds-distill plan --config=run.yaml --gpus_per_node=4 --nodes=2 --gpu_memory_gb=40 --train.gradient_checkpointing=true

For each teacher placement (`ds_config.TEACHER_PLACEMENTS`) and each student config in `ds_configs/` (the run's
own ones too), per rank:

    teacher weights  all of them (replicated); a 1/world partition plus what ZeRO-3 gathers for the running
                     module, the prefetched ones and the small weights it keeps whole (zero3); or only that
                     working set, the partition held in pinned host memory (cpu) or on NVMe (nvme)
    student states   parameters, gradients and Adam states, from DeepSpeed's own estimators
                     (`estimate_zero2_model_states_mem_needs`, `estimate_zero3_model_states_mem_needs`)
    step             the peak of live tensors over one training step: the teacher's logits, the student's
                     activations, the logit losses and the backward pass, traced on the CPU at the run's widths,
                     lengths, dtype and gradient checkpointing (`step_trace.py`)
    features         what the layer-wise losses read from the teacher (captured outputs of mapped layers), held
                     through the step's peak

It says which combinations fit `--gpu_memory_gb` (less a reserve for the CUDA context, the caching allocator and
communication buffers) and `--cpu_memory_gb`, which one it expects to be fastest and why, and prints the
overrides that select it, with the largest micro-batch that fits. Predictions against measured peaks:
bench/RESULTS.md ("plan vs measured").
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ds_distill import models
from ds_distill.config import deepspeed as ds_config
from ds_distill.config.run import RunConfig
from ds_distill.errors import ConfigError
from ds_distill.planner.trace import StepMemory, StepShape, step_memory, step_shape

GB = 2**30  # as the run logs peak_memory_gb
GPU_RESERVE_GB = 1.0  # CUDA context, communication buffers
GPU_SLACK = 0.05  # the caching allocator's fragmentation: allocated memory that cannot be handed out again
HOST_SLACK = 0.10  # the operating system, the data pipeline, page cache
PREFETCH_DEFAULT = 5e7  # DeepSpeed's stage3_prefetch_bucket_size default
PERSISTENCE_THRESHOLD = 1e4  # stage3_param_persistence_threshold in ds_configs/: smaller tensors stay whole

# Expected speed, best first; the reasons are what the user reads. Measured on one H100 (bench/RESULTS.md):
# replicated 1.00, CPU offload 0.86, ZeRO-3 on the GPU 0.81 (one GPU gathers over PCIe-free memory, yet pays
# the per-module gather and release; across GPUs the gather goes over NVLink while offload shares PCIe).
TEACHER_REASONS = {
    "replicated": "a whole bf16 copy per GPU: no gathering in any forward (1.24x of ZeRO-3 and 1.16x of CPU offload "
    "on one H100)",
    "zero3": "partitioned over the GPUs: every forward all-gathers the teacher's weights module by module",
    "cpu": "weights streamed from pinned host memory in every forward (0.86x of replicated on one H100)",
    "nvme": "weights read from NVMe in every forward: for a teacher that fits nowhere else",
}
STUDENT_REASONS = {
    "zero2": "ZeRO-2: whole weights on every GPU, no gathering; gradients and Adam states partitioned",
    "zero2_offload": "ZeRO-2 with Adam on the CPU: every step moves gradients out and weights back",
    "zero3": "ZeRO-3: weights gathered in every forward and backward",
    "zero3_offload": "ZeRO-3 with weights and Adam on the CPU: the least GPU memory, the slowest",
}


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


# ---------------------------------------------------------------------------------------------------------
# The plan


@dataclass
class Option:
    teacher: Placement | None
    student: Placement
    gpu: dict[str, float]  # per GPU, by part (step memory at the run's micro-batch)
    host: dict[str, float]  # per node
    nvme: float
    fixed_gpu: float  # everything but the step memory's per-example part
    fits_gpu: bool = False
    fits_host: bool = False

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_host

    def rank(self, world: int) -> tuple[int, int]:
        """Expected speed, lower first: the teacher's placement matters most (its forward is most of a step's
        arithmetic), then the student's."""
        teachers = ["replicated", "cpu", "zero3", "nvme"] if world == 1 else ["replicated", "zero3", "cpu", "nvme"]
        students = ["zero2", "zero3", "zero2_offload", "zero3_offload"]
        return (teachers.index(self.teacher.kind) if self.teacher else 0, students.index(self.student.kind))


@dataclass
class Plan:
    run: RunConfig
    hw: Hardware
    options: list[Option]
    teacher_size: ModelSize | None
    student_size: ModelSize
    step: StepMemory
    features_per_example: float
    vocab: int
    notes: list[str]
    trace_checkpointed: Callable[[], StepMemory] | None  # None: the run checkpoints already
    flag_prefix: str = ""  # "defaults." for a chain's stages

    @functools.cached_property
    def step_checkpointed(self) -> StepMemory | None:
        """Traced only when asked for: when nothing fits without gradient checkpointing."""
        return self.trace_checkpointed() if self.trace_checkpointed else None

    def best(self) -> Option | None:
        fitting = [o for o in self.options if o.fits]
        return min(fitting, key=lambda o: o.rank(self.hw.world)) if fitting else None


def candidate_placements(run: RunConfig) -> tuple[list[Placement], list[Placement]]:
    bf16 = run.train.bf16
    teachers: list[Placement] = []
    if run.teacher.model_name_or_path:
        paths = list(ds_config.TEACHER_PLACEMENTS.values())
        if run.teacher.deepspeed_config not in paths:
            paths.append(run.teacher.deepspeed_config)
        teachers = [Placement.read(p, "teacher", bf16) for p in paths]
    paths = sorted(f"ds_configs/{p.name}" for p in (ds_config.PROJECT_ROOT / "ds_configs").glob("student_*.json"))
    if run.student.deepspeed_config not in paths:
        paths.append(run.student.deepspeed_config)
    students = [Placement.read(p, "student", bf16) for p in paths]
    if run.prune is not None:  # HomoDistil scores ZeRO-2 optimizer partitions
        students = [s for s in students if not s.kind.startswith("zero3")]
    return teachers, students


def make_plan(run: RunConfig, hw: Hardware, vocab: int | None = None, gpu: bool = True, configs=None) -> Plan:
    """Everything `ds-distill plan` prints. `vocab`: the tokenizer's size (default: the student's vocabulary);
    `gpu`: trace the step as GPU kernels hold memory (False: as the CPU's do, for CPU runs); `configs`: the
    teacher's and the student's Hugging Face configs where the run's paths do not exist yet (a chain's stages)."""
    from ds_distill.objectives.registry import build_losses
    from ds_distill.train.loop import model_pair
    from ds_distill.train.student import student_hf_config

    notes = []
    if configs is not None:
        teacher_config, student_config = configs
    else:
        teacher_config = None
        if run.teacher.model_name_or_path:
            teacher_config = models.load_config(run.teacher.weights(), "teacher")
        student_config = student_hf_config(run.student, teacher_config)
    adapter = models.adapter_for(student_config)
    if vocab is None:
        vocab = student_config.vocab_size
        notes.append(f"logits compared on the student's {vocab:,} vocabulary rows (the tokenizer was not read)")
    pair = model_pair(run, student_config, teacher_config)
    losses, weights = build_losses(run.losses, pair, vocab_size=vocab)
    loss_params = sum(p.numel() for p in losses.parameters())
    teachers, students = candidate_placements(run)

    student_size = ModelSize.of(student_config)
    student_size = dataclasses.replace(student_size, params=student_size.params + loss_params)
    teacher_size = ModelSize.of(teacher_config) if teacher_config is not None else None
    shape = step_shape(run, adapter, vocab, gpu)
    logit_losses = {name: loss for name, loss in losses.items() if "logits" in loss.needs}
    teacher_bytes = 2 if teacher_config is not None and _teacher_bf16(run) else 4
    teacher_logits = None
    if any(loss.requires_teacher for loss in logit_losses.values()):
        teacher_logits = (teacher_config.vocab_size, torch.bfloat16 if teacher_bytes == 2 else torch.float32)
    step = step_memory(student_config, adapter, shape, logit_losses, weights, teacher_logits)
    checkpointed = None
    if not shape.checkpointing:
        checkpointed = functools.partial(
            step_memory, student_config, adapter, dataclasses.replace(shape, checkpointing=True), logit_losses,
            weights, teacher_logits,
        )  # fmt: skip
    features = feature_bytes(losses, pair, shape, teacher_bytes) if pair is not None else 0.0
    micro = run.train.per_device_train_batch_size
    loads_partitioned = bool(run.student.model_name_or_path) or (
        run.student.init.from_teacher is not None and run.student.init.from_teacher.strategy == "sliced"
    )
    options = []
    for student in students:
        student_part = student_cost(student, student_size, hw, loads_partitioned, gpu)
        for teacher in teachers or [None]:
            teacher_part = teacher_cost(teacher, teacher_size, hw) if teacher else Cost({}, {})
            device = {**teacher_part.gpu, **student_part.gpu, "step": step.at(micro), "features": features * micro}
            host = {**teacher_part.host}
            for name, value in student_part.host.items():
                host[name] = host.get(name, 0) + value
            fixed = sum(device.values()) - (step.per_example + features) * micro
            option = Option(teacher, student, device, host, teacher_part.nvme, fixed)
            option.fits_gpu = sum(device.values()) <= hw.usable_gpu
            option.fits_host = sum(host.values()) <= hw.usable_host
            options.append(option)
    return Plan(run, hw, options, teacher_size, student_size, step, features, vocab, notes, checkpointed)


def _teacher_bf16(run: RunConfig) -> bool:
    """The run's teacher config: bf16 where it says so or leaves it ("auto") to a bf16 run."""
    return Placement.read(run.teacher.deepspeed_config, "teacher", run.train.bf16).weight_bytes == 2


def tokenizer_size(run: RunConfig) -> int | None:
    """The tokenizer's length where it can be read without a download, else None."""
    source = run.data.tokenizer or run.teacher.model_name_or_path or run.student.model_name_or_path
    if not source or not Path(source).exists():
        return None
    from transformers import AutoTokenizer

    try:
        return len(AutoTokenizer.from_pretrained(source))
    except (OSError, ValueError):  # no tokenizer files there (a GGUF directory): plan on the model's vocabulary
        return None


def host_memory_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB


# ---------------------------------------------------------------------------------------------------------
# The report


def _gb(value: float) -> str:
    return f"{value / GB:,.1f}"


def largest_batch(plan: Plan, option: Option, step: StepMemory) -> int:
    per_example = step.per_example + plan.features_per_example
    room = plan.hw.usable_gpu - (option.fixed_gpu - plan.step.fixed + step.fixed)
    return max(0, math.floor(room / per_example)) if per_example > 0 else 0


def report(plan: Plan) -> str:
    run, hw = plan.run, plan.hw
    micro, accumulation = run.train.per_device_train_batch_size, run.train.gradient_accumulation_steps
    seq2seq = run.data.task in ("translation", "seq2seq")
    tokens = (f"{run.data.max_source_length} source + {run.data.max_target_length} target" if seq2seq
              else f"{run.data.block_size}")  # fmt: skip
    lines = [
        f"hardware: {hw.nodes} node(s) x {hw.gpus_per_node} GPU(s) of {hw.gpu_memory_gb:g} GB ({_gb(hw.usable_gpu)} "
        f"usable: {GPU_SLACK:.0%} allocator slack, {GPU_RESERVE_GB:g} GB reserve), {hw.cpu_memory_gb:,.0f} GB host "
        f"memory per node ({_gb(hw.usable_host)} usable)",
    ]
    if plan.teacher_size:
        lines.append(f"teacher {run.teacher.model_name_or_path}: {plan.teacher_size.params / 1e6:,.1f}M parameters")
    lines.append(f"student: {plan.student_size.params / 1e6:,.1f}M parameters trained (losses' own included)")
    checkpointing = "on" if run.train.gradient_checkpointing else "off"
    step = (f"step: micro-batch {micro} (x{accumulation} accumulated) of {tokens} tokens, "
            f"{'bf16' if run.train.bf16 else 'fp32'}, gradient checkpointing {checkpointing}: "
            f"{plan.step.per_example / GB:,.3f} GB per example + {plan.step.fixed / GB:,.3f} GB (traced)")  # fmt: skip
    lines.append(step)
    if plan.features_per_example:
        lines.append(f"layer-wise losses' features: {plan.features_per_example / GB:,.3f} GB per example")
    lines += [f"note: {note}" for note in plan.notes]

    header = f"{'per GPU, GB':<56}{'teacher':>8}{'student':>8}{'step':>8}{'total':>8}{'host/node':>10}  fits  max micro-batch"
    lines += ["", header]
    for option in sorted(plan.options, key=lambda o: o.rank(hw.world)):
        name = (f"{option.teacher.name} + " if option.teacher else "") + option.student.name
        gpu = option.gpu
        step_part = gpu["step"] + gpu["features"]
        fits = "yes" if option.fits else ("host" if option.fits_gpu else "no")
        lines.append(
            f"{name:<56}{_gb(gpu.get('teacher', 0)):>8}{_gb(gpu['student states']):>8}{_gb(step_part):>8}"
            f"{_gb(sum(gpu.values())):>8}{_gb(sum(option.host.values())):>10}  {fits:<4}  "
            f"{largest_batch(plan, option, plan.step) if option.fits_host else 0}"
        )
        if option.nvme:
            lines.append(f"{'':<56}(NVMe per node: {_gb(option.nvme)} GB)")
    lines.append("")
    lines += advice(plan)
    return "\n".join(lines)


def _overrides(option: Option, extra: dict[str, Any], prefix: str) -> str:
    settings = {"student.deepspeed_config": option.student.path, **extra}
    if option.teacher:
        settings = {"teacher.deepspeed_config": option.teacher.path, **settings}
    return "  " + " ".join(f"--{prefix}{key}={value}" for key, value in settings.items())


def _reason(option: Option) -> str:
    parts = [f"teacher {option.teacher.kind}: {TEACHER_REASONS[option.teacher.kind]}"] if option.teacher else []
    return "; ".join(parts + [f"student {STUDENT_REASONS[option.student.kind]}"])


def advice(plan: Plan) -> list[str]:
    """The fastest option that fits and its overrides; else the micro-batch or checkpointing that makes one fit."""
    run, hw = plan.run, plan.hw
    micro, accumulation = run.train.per_device_train_batch_size, run.train.gradient_accumulation_steps
    best = plan.best()
    if best is not None:
        lines = [f"fastest that fits: {_reason(best)}", _overrides(best, {}, plan.flag_prefix)]
        most = largest_batch(plan, best, plan.step)
        if most >= 2 * micro:
            lines.append(
                f"  micro-batches up to {most} fit with it; larger ones usually run faster on a GPU "
                f"(--train.per_device_train_batch_size, with gradient_accumulation_steps for the same global batch)"
            )
        return lines
    on_host = sorted((o for o in plan.options if o.fits_host), key=lambda o: o.rank(hw.world))
    global_batch = micro * accumulation
    for flag in ({}, {"train.gradient_checkpointing": "true"}):
        step = plan.step_checkpointed if flag else plan.step  # traced only if nothing fits without
        if step is None:
            continue
        for option in on_host:
            most = largest_batch(plan, option, step)
            if most >= 1:
                smaller = min(most, micro)
                steps = math.ceil(global_batch / smaller)
                return [
                    f"nothing fits at micro-batch {micro}{'' if not flag else ' without gradient checkpointing'}. "
                    f"Fastest that fits at micro-batch {smaller} "
                    f"(x{steps} accumulated for about the same global batch): {_reason(option)}",
                    _overrides(option, {**flag, "train.per_device_train_batch_size": smaller,
                                        "train.gradient_accumulation_steps": steps}, plan.flag_prefix),
                ]  # fmt: skip
    return [
        "nothing fits, not even one example per GPU with gradient checkpointing: use more GPUs (ZeRO-3 partitions "
        "the teacher and the student over them), GPUs with more memory, or shorter sequences"
    ]
