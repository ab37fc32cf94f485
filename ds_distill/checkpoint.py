"""Resumable checkpoints that are either complete or invisible, and the output-directory contract.

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
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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
    set_rng_state(torch.load(root / tag / f"rng_rank{dist.rank()}.pt", weights_only=False))
    return client_state


def claim_output_dir(output_dir: Path, config_yaml: str, resume: bool, overwrite: bool) -> bool:
    """Checks `output_dir` against this run; returns whether a checkpoint exists to resume from.

    A directory holding another run is refused unless --resume (continue it, even with changed settings
    such as a larger max_steps) or --overwrite (delete it) is given; nothing is ever deleted silently.
    """
    saved = output_dir / "config.yaml"
    has_checkpoint = latest_tag(output_dir / "checkpoints") is not None
    if overwrite and resume:
        raise ConfigError("give --resume or --overwrite, not both")
    if overwrite:
        if output_dir.exists() and any(output_dir.iterdir()) and not saved.is_file():
            raise ConfigError(f"--overwrite refused: {output_dir} holds files that are not a ds_distill run")
        dist.barrier()
        if dist.is_main() and output_dir.exists():
            shutil.rmtree(output_dir)
        dist.barrier()
        return False
    if resume:
        if not has_checkpoint:
            raise ConfigError(
                f"--resume: no complete checkpoint in {output_dir / 'checkpoints'}; start without --resume"
            )
        return True
    if saved.is_file() or has_checkpoint:
        same = saved.is_file() and saved.read_text() == config_yaml
        what = "this run's checkpoints" if same else "a run with a different config"
        raise ConfigError(
            f"{output_dir} already holds {what}; pass --resume to continue it or --overwrite to replace it"
        )
    return False
