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
