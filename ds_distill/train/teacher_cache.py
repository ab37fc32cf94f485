"""The teacher's top-k outputs on disk: written once, read by KD runs that then load no teacher.

    ds-distill cache_teacher --config=RUN.yaml --output_dir=DIR [--top_k=64]
    deepspeed --num_gpus 8 --module ds_distill cache_teacher --config=RUN.yaml --output_dir=DIR
    ds-distill distill --config=RUN.yaml --teacher.cache=DIR          # KD from DIR, no teacher loaded

For every example of the run's tokenized training split and every target position of it (where the KD term
looks), the teacher's k most likely ids, their log-probabilities at the run's KD temperature and the log of the
probability left to all other ids (`objectives/topk.py`). DIR holds:

    cache.json                 what it was written from (`fingerprint`), k, dtype, shard size; `complete` at the end
    shard_00000.safetensors    examples [m] int64 (ascending), offsets [m + 1] int64 (row ranges per example),
                               topk_ids [rows, k] int32, topk_logprobs [rows, k] bf16 (or float32),
                               tail_logmass [rows] float32

388 bytes per target token at k = 64 in bf16. Shard s holds examples s x shard_examples onwards; ranks write
different shards at once, each shard is written whole or not at all, and a rerun of the same command writes only
the missing ones (shards.py). A shard's contents depend only on its examples, not on the number of ranks.
"""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path

import numpy as np
import torch

from ds_distill import models
from ds_distill.config.run import RunConfig
from ds_distill.data import IGNORE_INDEX
from ds_distill.data import tokenized as data
from ds_distill.errors import ConfigError
from ds_distill.objectives import topk
from ds_distill.objectives.features import aligned_labels
from ds_distill.objectives.logits import LogitDistillationLoss
from ds_distill.objectives.registry import build_losses
from ds_distill.train import shards

MANIFEST = "cache.json"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def shard_name(shard: int) -> str:
    return f"shard_{shard:05d}.safetensors"


# -- what a cache was written from ------------------------------------------------------------------------------
def kd_temperature(run: RunConfig, pair) -> float:
    """The temperature of the run's KD term, which the cached log-probabilities are taken at."""
    losses, _ = build_losses(run.losses, pair)
    kd = [loss for loss in losses.values() if isinstance(loss, LogitDistillationLoss)]
    if not kd:
        raise ConfigError("a teacher cache serves the kd term, and this run has none; add losses.kd")
    return kd[0].options.temperature


def _weight_digest(path: Path) -> str:
    """A file's size and three 1 MiB samples (start, middle, end): tells fine-tunes of one architecture apart
    without hashing gigabytes at every run's start."""
    size = path.stat().st_size
    digest = sha256(str(size).encode())
    with open(path, "rb") as file:
        for start in sorted({0, max(0, size // 2 - 2**19), max(0, size - 2**20)}):
            file.seek(start)
            digest.update(file.read(2**20))
    return digest.hexdigest()


def teacher_identity(run: RunConfig, teacher_config) -> dict:
    """The teacher's architecture and a digest of each weight file (where it is a local directory), not its path:
    a teacher copied elsewhere still matches."""
    config = {k: v for k, v in teacher_config.to_dict().items() if k not in ("transformers_version", "_name_or_path")}
    identity = {"config_sha256": sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()}
    directory = Path(run.teacher.model_name_or_path)
    if directory.is_dir():
        weights = [p for p in sorted(directory.iterdir()) if p.suffix in (".safetensors", ".bin", ".gguf", ".pt")]
        identity["weights"] = {p.name: _weight_digest(p) for p in weights}
    else:
        identity["hub_id"] = run.teacher.model_name_or_path
    return identity


def split_digest(split) -> str:
    """SHA-256 of the tokenized training split's token columns (values and row lengths): the examples the
    cache's rows belong to, whatever produced them."""
    import pyarrow.compute as pc

    table = split.with_format("arrow")[:]
    digest = sha256()
    for name in sorted(table.column_names):
        column = table[name].combine_chunks()
        digest.update(name.encode())
        if hasattr(column, "flatten"):  # a list column: lengths, then the values
            digest.update(pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
            column = pc.list_flatten(column)
        digest.update(column.to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
    return digest.hexdigest()


def fingerprint(run: RunConfig, teacher_config, tokenizer, split, temperature: float) -> dict:
    """What the cached values depend on besides k: teacher, tokenizer and data settings, the training split's
    tokens and the KD temperature."""
    return {
        "teacher": teacher_identity(run, teacher_config),
        "data": json.loads(json.dumps(data.describe(run.data, tokenizer))),
        "train_examples": len(split),
        "train_split_sha256": split_digest(split),
        "temperature": temperature,
    }


def read_manifest(directory: Path) -> dict | None:
    return shards.read_manifest(directory / MANIFEST)


def check_run(run: RunConfig, teacher_config, student_config, tokenizer, split, pair) -> None:
    """Refuses a run with `teacher.cache` that the cache cannot serve, before any weights load: terms that need
    the online teacher, masked LM, students cut from the teacher, an unfinished cache or one written from
    another teacher, data or temperature (the differing parts named)."""
    directory = Path(run.teacher.cache)
    if run.data.task == "masked_lm":
        raise ConfigError("teacher.cache: masked LM inputs are masked anew at every step, so no cache holds them")
    dims = run.student.init.from_teacher
    if dims is not None and dims.strategy == "sliced":
        raise ConfigError(
            "teacher.cache: a sliced student is cut from the teacher's weights, which a cached run does not load; "
            "cut it first (ds-distill make_student) and give it as student.model_name_or_path"
        )
    losses, _ = build_losses(run.losses, pair)
    online = [
        name for name, loss in losses.items() if loss.requires_teacher and not isinstance(loss, LogitDistillationLoss)
    ]
    if online:
        raise ConfigError(
            f"teacher.cache holds the teacher's output distributions only; losses {', '.join(online)} read its "
            "layers: run them with the online teacher (no teacher.cache)"
        )
    temperature = kd_temperature(run, pair)
    manifest = read_manifest(directory)
    if manifest is None:
        raise ConfigError(f"teacher.cache {directory} holds no cache; write it with ds-distill cache_teacher")
    if not manifest.get("complete"):
        raise ConfigError(
            f"teacher.cache {directory} is unfinished; run the ds-distill cache_teacher command that wrote it again"
        )
    wanted = fingerprint(run, teacher_config, tokenizer, split, temperature)
    differ = sorted(key for key in wanted if manifest["fingerprint"].get(key) != wanted[key])
    if differ:
        details = {
            "teacher": "teacher config or weights",
            "temperature": f"temperature {manifest['fingerprint']['temperature']} vs the run's {temperature}",
            "data": "data settings or tokenizer",
            "train_examples": "training examples",
            "train_split_sha256": "training split tokens",
        }
        raise ConfigError(
            f"teacher.cache {directory} was written for another run ({', '.join(details.get(k, k) for k in differ)} "
            "differ); write it again with ds-distill cache_teacher --config=THIS_RUN"
        )
    vocabulary = student_config.vocab_size
    if manifest["top_k"] > vocabulary:
        raise ConfigError(f"teacher.cache {directory} holds k = {manifest['top_k']} > the student's vocabulary")


# -- reading ----------------------------------------------------------------------------------------------------
class CachedTeacher:
    """The teacher's side of a step read from a cache. `rows(batch)` (on the host, in the batch's collation)
    returns the batch's cached top-k laid out as the logits: `[batch, positions, k]`, zeros where no label
    counts; `features(batch)` hands them to the KD term as the online teacher's features would be."""

    def __init__(self, directory: str | Path, adapter: models.ModelAdapter):
        self.directory = Path(directory)
        self.adapter = adapter
        manifest = read_manifest(self.directory)
        self.top_k, self.dtype = manifest["top_k"], DTYPES[manifest["dtype"]]
        self.shard_examples = manifest["shard_examples"]
        self._open: dict[int, tuple] = {}

    def __getstate__(self):  # collated in DataLoader workers: each process opens the shards itself
        return {**self.__dict__, "_open": {}}

    def _shard(self, shard: int):
        if shard not in self._open:
            from safetensors import safe_open

            handle = safe_open(self.directory / shard_name(shard), framework="pt")
            self._open[shard] = (handle, handle.get_tensor("offsets"), int(handle.get_tensor("examples")[0]))
        return self._open[shard]

    def example_rows(self, example: int) -> dict[str, torch.Tensor]:
        """The cached rows of one example of the training split, in the order of its target positions."""
        handle, offsets, first = self._shard(example // self.shard_examples)
        start, end = offsets[example - first].item(), offsets[example - first + 1].item()
        return {key: handle.get_slice(key)[start:end] for key in topk.KEYS}

    def rows(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        labels = aligned_labels(self.adapter, batch["labels"])
        out = {
            "topk_ids": torch.zeros(*labels.shape, self.top_k, dtype=torch.int32),
            "topk_logprobs": torch.zeros(*labels.shape, self.top_k, dtype=self.dtype),
            "tail_logmass": torch.zeros(labels.shape, dtype=torch.float32),
        }
        for row, example in enumerate(batch["example_index"].tolist()):
            positions = (labels[row] != IGNORE_INDEX).nonzero().squeeze(1)
            cached = self.example_rows(example)
            if len(cached["tail_logmass"]) != len(positions):
                raise RuntimeError(
                    f"training example {example} has {len(positions)} target tokens, its cached rows "
                    f"{len(cached['tail_logmass'])}: the cache in {self.directory} belongs to other data"
                )
            for key, values in cached.items():
                out[key][row, positions] = values
        return out

    def features(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: batch[key] for key in topk.KEYS}
