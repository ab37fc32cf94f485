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


def save(engine, root: Path, step: int, client_state: dict[str, Any], keep: int) -> None:
    """Collective: every rank must call it. Marks the checkpoint complete only once all ranks wrote."""
    tag = f"step_{step}"
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), root / tag / f"rng_rank{dist.rank()}.pt")
    dist.barrier()
    if dist.is_main():
        (root / tag / COMPLETE).write_text(json.dumps({"step": step}))
        _write_atomically(root / "latest", tag)
        _prune(root, keep)
    dist.barrier()


def _prune(root: Path, keep: int) -> None:
    tags = sorted(complete_tags(root), key=lambda t: int(t.split("_")[1]))
    for tag in tags[: max(0, len(tags) - keep)]:
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
    return max(tags, key=lambda t: int(t.split("_")[1])) if tags else None


def load(engine, root: Path, tag: str) -> dict[str, Any]:
    """Restores engine state and this rank's RNG; returns the client state saved with the checkpoint."""
    saved_ranks = len(list((root / tag).glob("rng_rank*.pt")))
    if saved_ranks != dist.world_size():  # the same answer on every rank, so all of them stop
        raise ConfigError(
            f"{root / tag} was saved by {saved_ranks} ranks; resume it with {saved_ranks}, not {dist.world_size()}"
        )
    _, client_state = engine.load_checkpoint(str(root), tag=tag)
    if client_state is None:
        raise ConfigError(f"checkpoint {root / tag} could not be loaded by DeepSpeed")
    set_rng_state(torch.load(root / tag / f"rng_rank{dist.rank()}.pt", weights_only=True))
    return client_state
