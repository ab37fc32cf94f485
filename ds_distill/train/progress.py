"""What a run reports while it trains: loss sums and token counts per logging window, memory gauges, and the
log (TensorBoard and log.jsonl) they go to."""

from __future__ import annotations

import json
import os
import resource
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ds_distill import dist


def run_summary(p, resumed_at: int) -> str:
    """What a run is about to do, in one block: both models (family, size, where each lives), the data, the
    steps and batch, where its files go, and how to go on after a stop. `p`: the run's `Prepared`."""
    from ds_distill import models
    from ds_distill.config import deepspeed as ds_config
    from ds_distill.data import batches

    def model(config) -> str:
        adapter = models.adapter_for(config)
        return f"{adapter.name} ({adapter.kind}), {models.count_parameters(config) / 1e6:,.1f}M parameters"

    def placement(settings) -> str:
        zero = settings.get("zero_optimization", {})
        offload = (zero.get("offload_param") or {}).get("device", "none")
        where = {"cpu": ", parameters in CPU memory", "nvme": ", parameters on NVMe"}.get(offload, "")
        stage = ds_config.zero_stage(settings)
        return ("replicated on every rank" if stage < 3 else f"ZeRO-3 partitioned over {ranks}") + where

    run, train = p.run, p.run.train
    ranks = f"{dist.world_size()} rank{'s' if dist.world_size() > 1 else ''}"
    lines = []
    if p.teacher_config is not None:
        lives = f"from the cache {run.teacher.cache}" if run.teacher.cache else placement(p.teacher_ds)
        lines.append(f"teacher  {run.teacher.model_name_or_path}: {model(p.teacher_config)}; {lives}")
    dims = run.student.init.from_teacher
    source = run.student.model_name_or_path or ("cut from the teacher" if dims.strategy == "sliced" else "random")
    stage = ds_config.zero_stage(p.student_ds)
    lines.append(f"student  {source}: {model(p.student_config)}; ZeRO-{stage} over {ranks}")
    splits = [f"{name} {len(rows):,} rows" for name, rows in p.datasets.items()]
    train_tokens = int(batches.example_lengths(p.datasets[run.data.train_split]).sum())
    lines.append(
        f"data     {run.data.dataset} ({run.data.task}): {', '.join(splits)}; {train_tokens:,} training tokens"
    )
    per_step = train.per_device_train_batch_size * train.gradient_accumulation_steps * dist.world_size()
    lines.append(f"steps    {p.total_steps:,}" + (f", from step {resumed_at}" if resumed_at else "") +
                 f"; {per_step} examples a step ({train.per_device_train_batch_size} per rank x "
                 f"{train.gradient_accumulation_steps} accumulated x {ranks})")  # fmt: skip
    saves = f"checkpoints/ every {train.save_steps} steps" if train.save_steps > 0 else "no checkpoints"
    lines.append(f"output   {p.output_dir}: log.jsonl, {saves}, model/ at the end")
    lines.append(f"watch    tensorboard --logdir {p.output_dir / 'tensorboard'}")
    lines.append("resume   the same command with --resume after a stop (--resume=auto: only this same run)")
    return "\n".join(lines)


def peak_memory_gb(reset: bool = False) -> float:
    """Peak accelerator memory (`reset`: from now on); on the CPU accelerator, the process's peak resident host
    memory, which cannot be reset."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        if reset:
            get_accelerator().reset_peak_memory_stats()
        return get_accelerator().max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def memory_in_use_gb() -> float:
    """Accelerator memory allocated now; on the CPU accelerator, the process's resident host memory now."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return get_accelerator().memory_allocated() / 2**30
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


@dataclass
class LogWindow:
    """Loss sums (device tensors: read once per logging step, not per micro-step) and token counts since the
    last logged step."""

    sums: dict[str, Any] = field(default_factory=lambda: defaultdict(float))
    steps: int = 0
    tokens: int = 0
    positions: int = 0
    started: float = field(default_factory=time.perf_counter)


class RunLog:
    """The scalars of a run, on the main rank: TensorBoard events and one JSON line per logged step in
    output_dir/log.jsonl. Opened at `step` (a resumed run): what a crashed run wrote after it is dropped."""

    def __init__(self, output_dir: Path, step: int):
        self.path = output_dir / "log.jsonl"
        self.writer = None
        if not dist.is_main():
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=step + 1)
        if self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if self.writer is None:
            return
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()
        with open(self.path, "a") as log:
            log.write(json.dumps({"step": step, **scalars}) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
