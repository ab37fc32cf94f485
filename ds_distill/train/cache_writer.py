"""`ds-distill cache_teacher`: the teacher's top-k at every target position of the training split, to disk.

    ds-distill cache_teacher --config=RUN.yaml --output_dir=DIR [--top_k=64] [--batch_size=32]
    deepspeed --num_gpus 8 --module ds_distill cache_teacher --config=RUN.yaml --output_dir=DIR

The format and its reader are in teacher_cache.py. The teacher loads as in a run (its own DeepSpeed JSON, ZeRO-3
partitioned where it says so); the shards still missing are dealt out to the ranks, round by round, and each
rank writes its own (shards.py). A ZeRO-3 forward needs every rank, so a rank left without a shard in the last
round runs the others' forwards on a stand-in batch.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ds_distill import dist, models
from ds_distill.config.run import RunConfig, cross_tokenizer
from ds_distill.data import IGNORE_INDEX, batches
from ds_distill.errors import ConfigError
from ds_distill.objectives import topk
from ds_distill.objectives.features import forward_features
from ds_distill.train import shards
from ds_distill.train.prepare import model_pair, prepare
from ds_distill.train.teacher import load_teacher
from ds_distill.train.teacher_cache import DTYPES, MANIFEST, fingerprint, kd_temperature, shard_name

ROW_CHUNK_ELEMENTS = 2**25
"""Logits per top-k chunk: float32 temporaries of 128 MB whatever the vocabulary."""
LOW_MASS = 0.9
"""Below this mean probability in the top-k, `cache_teacher` warns (SmolLM2's top-64 hold 80% at T = 1, 17% at
T = 2, and the KD term from them is 15% and 62% below the online one: bench/RESULTS.md)."""


@dataclasses.dataclass
class CacheSettings:
    top_k: int = 64
    dtype: str = "bfloat16"
    batch_size: int = 16
    shard_examples: int = 4096

    def check(self, vocabulary: int) -> None:
        if not 0 < self.top_k <= vocabulary:
            raise ConfigError(f"--top_k must lie between 1 and the vocabulary ({vocabulary}), got {self.top_k}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype '{self.dtype}' is unknown; choose one of {', '.join(DTYPES)}")
        for name in ("batch_size", "shard_examples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1")


def write_cache(run: RunConfig, directory: Path, settings: CacheSettings, overwrite: bool = False) -> Path:
    """Writes (or finishes) the cache of `run`'s teacher in `directory`; returns it."""
    if cross_tokenizer(run):
        raise ConfigError("cache_teacher does not work across tokenizers yet (losses.kd.cross_tokenizer): the cache "
                          "holds the teacher's top-k of its own vocabulary at the student's positions")  # fmt: skip
    dist.init(run.train.ddp_timeout)
    run = dataclasses.replace(run, teacher=dataclasses.replace(run.teacher, cache=None))
    if not run.teacher.model_name_or_path:
        raise ConfigError("cache_teacher needs teacher.model_name_or_path")
    if run.data.task == "masked_lm":
        raise ConfigError("masked LM inputs are masked anew at every step, so their teacher outputs cannot be cached")
    p = prepare(run, claim=False)
    settings.check(len(p.tokenizer))
    split = p.datasets[run.data.train_split]
    temperature = kd_temperature(run, model_pair(run, p.student_config, p.teacher_config))
    manifest = {
        "fingerprint": fingerprint(run, p.teacher_config, p.tokenizer, split, temperature),
        **dataclasses.asdict(settings),
        "shards": -(-len(split) // settings.shard_examples),
        "complete": False,
    }
    pending = shards.claim(directory, MANIFEST, manifest, lambda s: directory / shard_name(s), "a teacher cache",
                           overwrite)  # fmt: skip
    teacher = load_teacher(models.teacher_weights(run.teacher), p.teacher_ds)
    try:
        _write_shards(teacher, p, split, directory, settings, temperature, pending, manifest["shards"])
    finally:
        teacher.destroy()
    if dist.is_main():
        paths = [directory / shard_name(s) for s in range(manifest["shards"])]
        held = torch.cat([_held_mass(path) for path in paths])
        manifest["bytes"] = sum(path.stat().st_size for path in paths)
        manifest["target_tokens"] = len(held)
        manifest["top_k_mass_mean"] = held.mean().item() if len(held) else 1.0
        manifest["complete"] = True
        shards.write_manifest(directory / MANIFEST, manifest)
        per_token = manifest["bytes"] / max(manifest["target_tokens"], 1)
        print(f"cached the teacher's top-{settings.top_k} for {manifest['target_tokens']:,} target tokens in "
              f"{directory} ({manifest['bytes'] / 1e6:.1f} MB, {per_token:.0f} bytes per token); they hold "
              f"{manifest['top_k_mass_mean']:.1%} of its probability at T = {temperature} on average")  # fmt: skip
        if manifest["top_k_mass_mean"] < LOW_MASS:
            print(f"warning: the rest's one bucket holds {1 - manifest['top_k_mass_mean']:.0%} of the teacher's "
                  "probability, and what differs inside it is lost to the KD term: raise --top_k or lower "
                  "losses.kd.temperature (bench/RESULTS.md, 'Teacher cache')")  # fmt: skip
    dist.barrier()
    return directory


def _held_mass(path: Path) -> torch.Tensor:
    """The probability the top-k hold, per cached token of a shard."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        return 1 - handle.get_tensor("tail_logmass").exp()


def _write_shards(teacher, p, split, directory: Path, settings: CacheSettings, temperature: float, pending, total):
    """Each rank's shards, round by round (`shards.rounds`)."""
    collate = batches.make_collator(p.run.data, p.tokenizer, teacher.module)
    adapter = models.adapter_for(teacher.module.config)
    lengths = batches.example_lengths(split)
    device = teacher.device
    stand_in = collate([split[0]])
    progress = tqdm(total=total, initial=total - len(pending), desc="cache_teacher", unit="shard",
                    disable=not dist.is_main(), dynamic_ncols=True)  # fmt: skip
    for mine, finished in shards.rounds(pending):
        groups = []
        if mine is not None:
            groups = shards.batches(mine, settings.shard_examples, len(split), lengths, settings.batch_size)
        rows: dict[int, dict] = {}
        for group in shards.in_step(groups):
            batch = collate([split[i] for i in group]) if group else stand_in
            batch = {key: value.to(device) for key, value in batch.items()}
            results = batch_top_k(teacher, adapter, batch, len(p.tokenizer), temperature, settings)
            if group:
                rows.update(zip(group, results))
        if mine is not None:
            _save_shard(directory / shard_name(mine), rows)
        progress.update(finished)
    progress.close()
    dist.barrier()


@torch.no_grad()
def batch_top_k(teacher, adapter, batch, vocabulary: int, temperature: float, settings: CacheSettings) -> list[dict]:
    """The teacher's top-k at the target positions of each example of `batch` (`topk.top_k` of its logits over
    the tokenizer's vocabulary at `temperature`), one dict of rows per example, on the host."""
    features = forward_features(teacher, adapter, batch)
    labels, logits = features["labels"], features["logits"]
    example, position = (labels != IGNORE_INDEX).nonzero(as_tuple=True)
    step = max(1, ROW_CHUNK_ELEMENTS // vocabulary)
    # divided by T in float32, as the online KD term divides (a bf16 quotient is off by up to 0.4% of a logit)
    chunks = [
        topk.top_k(logits[example[i : i + step], position[i : i + step], :vocabulary].float() / temperature,
                   settings.top_k, DTYPES[settings.dtype])
        for i in range(0, example.numel(), step)
    ]  # fmt: skip
    empty = {"topk_ids": (torch.int32, (0, settings.top_k)), "topk_logprobs": (DTYPES[settings.dtype], (0, settings.top_k)),
             "tail_logmass": (torch.float32, (0,))}  # fmt: skip
    rows = {
        key: torch.cat([chunk[key] for chunk in chunks]).cpu() if chunks else torch.empty(shape, dtype=dtype)
        for key, (dtype, shape) in empty.items()
    }
    counts = (labels != IGNORE_INDEX).sum(1).tolist()
    return [dict(zip(topk.KEYS, parts)) for parts in zip(*(rows[key].split(counts) for key in topk.KEYS))]


def _save_shard(path: Path, rows: dict[int, dict]) -> None:
    """Writes one shard whole, its examples in ascending order."""
    from safetensors.torch import save_file

    examples = sorted(rows)
    counts = torch.tensor([len(rows[i]["tail_logmass"]) for i in examples])
    tensors = {
        "examples": torch.tensor(examples, dtype=torch.int64),
        "offsets": torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]),
        **{key: torch.cat([rows[i][key] for i in examples]).contiguous() for key in topk.KEYS},
    }
    shards.write_atomically(path, lambda tmp: save_file(tensors, tmp))
