"""Process-group helpers: start-up for one or many ranks, and the one place for rank-0-only work.

Works under the `deepspeed` launcher, `torchrun`, SLURM-started ranks that set the usual variables, and a
plain `python` process (one rank, a free local port).
"""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import socket
import sys
import warnings
from pathlib import Path

import torch

from ds_distill import peers

# DeepSpeed's ZeRO-3 gathers call it on every step of every rank; the warning says nothing a user can act on
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                        category=FutureWarning)  # fmt: skip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init(timeout_s: int = 1800) -> None:
    """Joins (or, for a lone process, creates) the process group DeepSpeed uses. `timeout_s`: how long a
    collective may wait for the slowest rank (tokenizing, loading, writing checkpoints) before the job fails."""
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    said = io.StringIO()  # DeepSpeed prints "... shm_comm_op built successfully" on every CPU rank
    try:
        with contextlib.redirect_stdout(said):
            deepspeed.init_distributed(dist_backend=None, verbose=False, timeout=datetime.timedelta(seconds=timeout_s))
    except BaseException:
        sys.stdout.write(said.getvalue())  # an op that failed to build: what it printed is the diagnosis
        raise
    if not is_main():  # one progress bar per job: rank 0's
        from transformers.utils import logging

        logging.disable_progress_bar()
    _release_shared_memory_names()
    peers.start(rank(), world_size())  # a lost rank stops the job in seconds, named, not after timeout_s


def _release_shared_memory_names() -> None:
    """DeepSpeed's CPU all-reduce maps one /dev/shm buffer per rank (69 MB) and never unlinks it, so every CPU
    run on one machine left its buffers in memory until reboot. Once every rank has mapped every buffer (each
    maps the others' while it joins, before this barrier) the names can go: the memory stays while mapped
    and is freed when the last rank exits, also after a kill -9."""
    if world_size() > 1:
        barrier()
    name = "deepspeed_allreduce_buffer_{}_{}_{}_{}".format(
        os.getuid(), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""), rank()
    )
    with contextlib.suppress(FileNotFoundError):
        os.unlink(Path("/dev/shm") / name)


def shutdown() -> None:
    """Leaves the process group in step with the other ranks (the end of a successful command)."""
    if initialized():
        peers.stop()
        barrier()
        torch.distributed.destroy_process_group()


def initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if initialized():
        torch.distributed.barrier()


def print_main(*args, file=None) -> None:
    """Prints on rank 0, on a line of its own while a progress bar is open: on a terminal above the bar (tqdm's
    write); in a log file, where a bar's last state ends without a newline, after a line break."""
    if not is_main():
        return
    from tqdm.auto import tqdm

    out, text = file or sys.stdout, " ".join(str(arg) for arg in args)
    if sys.stderr.isatty():
        tqdm.write(text, file=out)
    else:
        bar_open = any(not bar.disable for bar in list(getattr(tqdm, "_instances", ())))
        print(("\n" if bar_open else "") + text, file=out)
    out.flush()


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


@contextlib.contextmanager
def local_main_first():
    """Each node's local rank 0 runs the block first (filling the node's caches, all nodes at once); the other
    ranks run it after, reading them."""
    if local_rank() != 0:
        barrier()
    yield
    if local_rank() == 0:
        barrier()


def all_reduce_sum(values: list) -> list[float]:
    """Sums a few numbers (floats or one-element tensors) over ranks: one collective, one host sync."""
    if not initialized() or world_size() == 1:
        return [float(v) for v in values]
    from deepspeed.accelerator import get_accelerator

    device = get_accelerator().current_device_name()
    tensor = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(device).reshape(()) for v in values])
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def all_reduce_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Sums `tensor` over ranks, in place, without waiting for the result on the host."""
    if initialized() and world_size() > 1:
        torch.distributed.all_reduce(tensor)
    return tensor


def all_gather_objects(obj):
    if not initialized() or world_size() == 1:
        return [obj]
    out = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out
