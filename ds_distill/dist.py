"""Process-group helpers: start-up for one or many ranks, and the one place for rank-0-only work.

Works under the `deepspeed` launcher, `torchrun`, SLURM-started ranks that set the usual variables, and a
plain `python` process (one rank, a free local port).
"""

from __future__ import annotations

import contextlib
import os
import socket

import torch


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init() -> None:
    """Joins (or, for a lone process, creates) the process group DeepSpeed uses."""
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    deepspeed.init_distributed(dist_backend=None, verbose=False)


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


def print_main(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)


@contextlib.contextmanager
def main_process_first():
    """Rank 0 runs the block first (filling caches); the others run it after, reading them."""
    if not is_main():
        barrier()
    yield
    if is_main():
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


def all_gather_objects(obj):
    if not initialized() or world_size() == 1:
        return [obj]
    out = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out
