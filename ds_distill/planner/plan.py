"""`ds-distill plan`: memory per rank for every placement of the teacher and the student, before a launch.

    ds-distill plan --recipe=flan_t5_3b_145m --gpus_per_node=8 --gpu_memory_gb=80 --cpu_memory_gb=1000
    ds-distill plan --config=run.yaml --gpus_per_node=4 --nodes=2 --gpu_memory_gb=40 --train.gradient_checkpointing=true

For each teacher placement (`ds_config.TEACHER_PLACEMENTS`) and each student config in `ds_configs/` (the run's
own ones too), per rank:

    teacher weights  all of them (replicated); a 1/world partition plus what ZeRO-3 gathers for the running
                     module, the prefetched ones and the small weights it keeps whole (zero3); or only that
                     working set, the partition held in pinned host memory (cpu) or on NVMe (nvme)
    student states   parameters, gradients and Adam states, from DeepSpeed's own estimators
                     (`estimate_zero2_model_states_mem_needs`, `estimate_zero3_model_states_mem_needs`; under
                     ZeRO-3 with one gathered largest module and its gradient: the LM head, which the logit
                     terms' chunk pass gathers once in the forward and once in the backward, `head.py`)
    step             the peak of live tensors over one training step: the teacher's logits, the student's
                     activations, the logit losses and the backward pass, traced on the CPU at the run's widths,
                     lengths, dtype and gradient checkpointing (`trace.py`)
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

import torch

from ds_distill import models
from ds_distill.config import deepspeed as ds_config
from ds_distill.config.run import RunConfig, cross_tokenizer
from ds_distill.planner.memory import (
    GB,
    Cost,
    Hardware,
    ModelSize,
    Placement,
    feature_bytes,
    student_cost,
    teacher_cost,
)
from ds_distill.planner.trace import StepMemory, step_memory, step_shape


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
    if run.teacher.model_name_or_path and not run.teacher.cache:  # a cached run loads no teacher
        paths = with_own(list(ds_config.TEACHER_PLACEMENTS.values()), run.teacher.deepspeed_config)
        teachers = [Placement.read(p, "teacher", bf16) for p in paths]
    paths = sorted(f"ds_configs/{p.name}" for p in (ds_config.PROJECT_ROOT / "ds_configs").glob("student_*.json"))
    students = [Placement.read(p, "student", bf16) for p in with_own(paths, run.student.deepspeed_config)]
    if run.prune is not None:  # HomoDistil scores ZeRO-2 optimizer partitions
        students = [s for s in students if not s.kind.startswith("zero3")]
    return teachers, students


def with_own(project: list[str], own: str) -> list[str]:
    """The project's DeepSpeed configs (by their short names), and the run's own where it is none of them."""
    known = {ds_config.resolve_path(path).resolve() for path in project}
    return project if ds_config.resolve_path(own).resolve() in known else [*project, own]


def make_plan(run: RunConfig, hw: Hardware, vocab: int | None = None, gpu: bool = True, configs=None) -> Plan:
    """Everything `ds-distill plan` prints. `vocab`: the tokenizer's size (default: the student's vocabulary);
    `gpu`: trace the step as GPU kernels hold memory (False: as the CPU's do, for CPU runs); `configs`: the
    teacher's and the student's Hugging Face configs where the run's paths do not exist yet (a chain's stages)."""
    from ds_distill.objectives.registry import build_losses
    from ds_distill.train.prepare import model_pair
    from ds_distill.train.student import student_hf_config

    notes = []
    if configs is not None:
        teacher_config, student_config = configs
    else:
        teacher_config = None
        if run.teacher.model_name_or_path:
            teacher_config = models.load_config(models.teacher_weights(run.teacher), "teacher")
        student_config = student_hf_config(run.student, teacher_config)
    adapter = models.adapter_for(student_config)
    if vocab is None:
        vocab = student_config.vocab_size
        notes.append(f"logits compared on the student's {vocab:,} vocabulary rows (the tokenizer was not read)")
    pair = model_pair(run, student_config, teacher_config)
    spec = run.losses
    if cross_tokenizer(run):
        # its chunks hold the same student rows and gather the teacher's by group: traced as the same-tokenizer term
        kd = spec["kd"]
        same = dataclasses.replace(kd.options, cross_tokenizer=None, hybrid_matched_weight=None)
        spec = {**spec, "kd": dataclasses.replace(kd, options=same)}
        notes.append("losses.kd.cross_tokenizer: traced as the same-tokenizer KD term (the same rows per chunk)")
    losses, weights = build_losses(spec, pair, vocab_size=vocab)
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
        if run.teacher.cache:
            notes.append("teacher.cache: no teacher loads; the step is traced with the teacher's whole logits, "
                         "so it is overstated by about their size (the cached top-k rows are far smaller)")  # fmt: skip
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


def make_students_plan(runs: dict[str, RunConfig], hw: Hardware, vocab: int | None = None) -> Plan:
    """The plan of several students on one teacher pass (`students:`): per placement, the teacher's weights once,
    every student's states, the largest of their steps (they step one after another, each freeing its
    activations), and the features all of them read (their sum, an upper bound of the union the teacher keeps)."""
    plans = {name: make_plan(run, hw, vocab) for name, run in runs.items()}

    def key(option: Option) -> tuple:
        return (option.teacher.path if option.teacher else None, option.student.path)

    shared_keys = set.intersection(*({key(o) for o in plan.options} for plan in plans.values()))
    largest = max(plans.values(), key=lambda plan: plan.step.per_example)
    features = sum(plan.features_per_example for plan in plans.values())
    micro = largest.run.train.per_device_train_batch_size
    options = []
    for option in (o for o in largest.options if key(o) in shared_keys):
        parts = [next(o for o in plan.options if key(o) == key(option)) for plan in plans.values()]
        gpu = {**option.gpu, "student states": sum(o.gpu["student states"] for o in parts)}
        gpu["step"] = max(o.gpu["step"] for o in parts)
        gpu["features"] = features * micro
        host = {name: value for name, value in option.host.items() if name.startswith("teacher")}
        host["student states"] = sum(o.host.get("student states", 0) for o in parts)
        fixed = sum(gpu.values()) - (largest.step.per_example + features) * micro
        combined = Option(option.teacher, option.student, gpu, host, option.nvme, fixed)
        combined.fits_gpu = sum(gpu.values()) <= hw.usable_gpu
        combined.fits_host = sum(host.values()) <= hw.usable_host
        options.append(combined)
    sizes = ", ".join(f"{name} {plan.student_size.params / 1e6:,.1f}M" for name, plan in plans.items())
    notes = [*largest.notes, f"students: {sizes}; the step shown is the largest student's"]
    student_size = dataclasses.replace(largest.student_size, params=sum(p.student_size.params for p in plans.values()))
    return dataclasses.replace(
        largest, options=options, student_size=student_size, features_per_example=features, notes=notes
    )


def _teacher_bf16(run: RunConfig) -> bool:
    """The run's teacher config: bf16 where it says so or leaves it ("auto") to a bf16 run."""
    return Placement.read(run.teacher.deepspeed_config, "teacher", run.train.bf16).weight_bytes == 2


def tokenizer_size(run: RunConfig) -> int | None:
    """The (student's) tokenizer's length where it can be read without a download, else None."""
    from ds_distill.data.tokenizers import tokenizer_source

    source = tokenizer_source(run, functools.partial(models.teacher_weights, run.teacher))
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


def largest_batch(plan: Plan, option: Option, step: StepMemory) -> int:
    per_example = step.per_example + plan.features_per_example
    room = plan.hw.usable_gpu - (option.fixed_gpu - plan.step.fixed + step.fixed)
    return max(0, math.floor(room / per_example)) if per_example > 0 else 0
