"""The plan as the user reads it: a table per placement, the fastest that fits and why, the overrides that select
it, and what to change when nothing fits."""

from __future__ import annotations

import math
from typing import Any

from ds_distill.planner.memory import GB, GPU_RESERVE_GB, GPU_SLACK
from ds_distill.planner.plan import Option, Plan, largest_batch

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


def _gb(value: float) -> str:
    return f"{value / GB:,.1f}"


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
