"""Resumable checkpoints that are either complete or invisible.

Layout under `output_dir/checkpoints/`::

    step_200/              DeepSpeed state (model, optimizer, scheduler shards), rng_rank*.pt, COMPLETE
    latest                 the tag of the newest complete checkpoint, replaced atomically
    student_template/      the student's config and tokenizer, so `ds-distill export` needs nothing else

DeepSpeed's own `latest` is turned off: a crash half-way through writing step_300 leaves `latest` on
step_200, and a tag without COMPLETE is never resumed from. DeepSpeed keeps no RNG state or data position,
so both travel here: the position in `client_state`, the RNG per rank beside the shards.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ds_distill import dist
from ds_distill.errors import ConfigError

COMPLETE = "COMPLETE"


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors, lists and numbers, so they load with `weights_only=True`."""
    version, mt_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": [version, list(mt_state), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(directory: Path) -> None:
    """Flushes the directory's files and the directory itself to disk (a crash must not leave a checkpoint
    marked complete whose shards are still in a page cache)."""
    for path in [*directory.rglob("*"), directory]:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _step(tag: str) -> int:
    return int(tag.split("_")[1])


EXTRA = "extra_state.pt"


def save(
    engine, root: Path, step: int, client_state: dict[str, Any], keep: int, extra: dict[str, torch.Tensor] | None = None
) -> None:
    """Collective: every rank must call it. The checkpoint is marked complete only once every rank reports
    that its files are written and flushed; any exception on one rank makes every rank raise at once, rather
    than leave the others waiting in a collective until the timeout. `extra`: tensors that rank 0 keeps beside
    the shards (HomoDistil's masks), loaded back with `weights_only=True`."""
    tag = f"step_{step}"
    if dist.is_main() and (root / tag).exists():  # left by a crash after an earlier save of this step
        shutil.rmtree(root / tag)
    dist.barrier()
    failure = None
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
        torch.save(rng_state(), root / tag / f"rng_rank{dist.rank()}.pt")
        if extra is not None and dist.is_main():
            torch.save(extra, root / tag / EXTRA)
        _fsync_tree(root / tag)
    except Exception as error:  # a full disk, a failing filesystem, a DeepSpeed error: the others must hear of it
        failure = error
    here = None if failure is None else f"rank {dist.rank()}: {type(failure).__name__}: {failure}"
    failures = [message for message in dist.all_gather_objects(here) if message]
    if failures:
        more = f"; and {len(failures) - 3} more ranks" if len(failures) > 3 else ""
        raise RuntimeError(
            f"checkpoint {root / tag} was not written completely ({'; '.join(failures[:3])}{more}); it is not "
            "marked complete, the last complete one stays"
        ) from failure
    if dist.is_main():
        (root / tag / COMPLETE).write_text(json.dumps({"step": step, "world_size": dist.world_size()}))
        _fsync_tree(root / tag)
        _write_atomically(root / "latest", tag)
        _prune(root, keep, newest=step)
    dist.barrier()


def _prune(root: Path, keep: int, newest: int) -> None:
    """Keeps the `keep` newest complete checkpoints; removes older ones and incomplete ones left by crashes."""
    complete = sorted(complete_tags(root), key=_step)
    stale = complete[: max(0, len(complete) - keep)]
    stale += [p.name for p in root.glob("step_*") if not (p / COMPLETE).is_file() and _step(p.name) < newest]
    for tag in stale:
        shutil.rmtree(root / tag, ignore_errors=True)


def complete_tags(root: Path) -> list[str]:
    return [p.name for p in root.glob("step_*") if (p / COMPLETE).is_file()]


def latest_tag(root: Path) -> str | None:
    """The newest complete checkpoint, or None."""
    latest = root / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if (root / tag / COMPLETE).is_file():
            return tag
    tags = complete_tags(root)
    return max(tags, key=_step) if tags else None


def _readable(root: Path, tag: str) -> str | None:
    """Why this rank cannot resume from `tag`, or None."""
    marker = root / tag / COMPLETE
    if not marker.is_file():
        return f"rank {dist.rank()} cannot see {marker}"
    saved = json.loads(marker.read_text()).get("world_size")
    if saved is None:  # written before the world size was recorded
        saved = len(list((root / tag).glob("rng_rank*.pt")))
    if saved != dist.world_size():
        return f"{root / tag} was saved by {saved} ranks; resume it with {saved}, not {dist.world_size()}"
    if not (root / tag / f"rng_rank{dist.rank()}.pt").is_file():
        return f"rank {dist.rank()} cannot see its RNG state in {root / tag}"
    return None


def load(engine, root: Path, tag: str) -> dict[str, Any]:
    """Restores engine state and this rank's RNG; returns the client state saved with the checkpoint.

    Collective: every rank checks that it can read rank 0's choice of checkpoint, and all of them stop with the
    same message if one cannot (node-local disks), instead of some raising while the others wait."""
    tag = dist.all_gather_objects(tag)[0]
    problems = [problem for problem in dist.all_gather_objects(_readable(root, tag)) if problem]
    if problems:
        raise ConfigError(
            f"cannot resume from {root / tag}: {problems[0]}"
            + (f" (and {len(problems) - 1} more ranks)" if len(problems) > 1 else "")
            + ". Checkpoints must be on a filesystem that every node reads and writes"
        )
    _, client_state = engine.load_checkpoint(str(root), tag=tag)
    if client_state is None:
        raise ConfigError(f"checkpoint {root / tag} could not be loaded by DeepSpeed")
    set_rng_state(torch.load(root / tag / f"rng_rank{dist.rank()}.pt", weights_only=True))
    return client_state


def extra_state(root: Path, tag: str) -> dict[str, torch.Tensor] | None:
    """What `save(extra=...)` kept with the checkpoint, or None."""
    path = root / tag / EXTRA
    return torch.load(path, weights_only=True) if path.is_file() else None
