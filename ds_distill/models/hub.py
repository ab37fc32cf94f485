"""What can be read of a model before its weights load: its config (the recipes' hub teachers have theirs shipped
in known_configs/, so counting and validating a recipe needs no network), the tensor names of its checkpoint,
and whether a local directory holds whole weights."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from ds_distill.errors import ConfigError

KNOWN_CONFIGS_DIR = Path(__file__).parent / "known_configs"


def checkpoint_keys(name_or_path: str) -> set[str] | None:
    """The tensor names in a checkpoint's safetensors files (headers only), or None where they cannot be read
    (PyTorch .bin weights, or a hub id that cannot be reached: loading then reports the problem)."""
    from safetensors import safe_open
    from transformers.utils import cached_file

    try:
        index = cached_file(name_or_path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
        if index:
            return set(json.loads(Path(index).read_text())["weight_map"])
        weights = cached_file(name_or_path, "model.safetensors", _raise_exceptions_for_missing_entries=False)
    except OSError:
        return None
    if not weights:
        return None
    with safe_open(weights, "pt") as handle:
        return set(handle.keys())


def load_config(name_or_path: str, role: str) -> PretrainedConfig:
    """`AutoConfig.from_pretrained` with a clear error. The recipes' hub teachers have their config shipped
    (`known_configs/`), so counting and validating a recipe needs no network."""
    known = KNOWN_CONFIGS_DIR / f"{name_or_path.replace('/', '--')}.json"
    if not Path(name_or_path).exists() and known.is_file():
        return AutoConfig.from_pretrained(known)
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"{role}.model_name_or_path '{name_or_path}' is neither a local model directory nor a reachable hub id "
            f"({str(error).splitlines()[0]}); check the path or download the model first"
        ) from None


WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def check_local_weights(name_or_path: str, role: str) -> None:
    """A local model directory must hold weights whose safetensors files are whole (safetensors checks that a
    file covers the tensors its header lists; every shard an index names present): checked before anything loads
    or is written. Hub ids are left to loading."""
    from safetensors import SafetensorError, safe_open

    directory = Path(name_or_path)
    if not directory.is_dir():
        return
    present = [name for name in WEIGHT_FILES if (directory / name).is_file()]
    if not present:
        raise ConfigError(f"{role}.model_name_or_path {directory} holds no weights (none of {', '.join(WEIGHT_FILES)})")
    files = []
    if present[0] == "model.safetensors.index.json":
        shards = sorted(set(json.loads((directory / present[0]).read_text()).get("weight_map", {}).values()))
        missing = [shard for shard in shards if not (directory / shard).is_file()]
        if missing:
            raise ConfigError(f"{role}.model_name_or_path {directory}: shard {missing[0]} named by {present[0]} "
                              f"is missing ({len(missing)} of {len(shards)})")  # fmt: skip
        files = [directory / shard for shard in shards]
    elif present[0] == "model.safetensors":
        files = [directory / present[0]]
    for path in files:
        try:
            with safe_open(path, "pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise ConfigError(f"{role} weights {path} cannot be read, truncated or not safetensors "
                              f"({str(error).splitlines()[0]})") from None  # fmt: skip


@contextlib.contextmanager
def quiet_saving():
    """Without transformers' "Writing model shards" bar: a save of a few shards, over in seconds."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()
