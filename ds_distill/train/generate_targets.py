"""`ds-distill generate_targets`: the teacher's outputs for the training split's sources, as training data for
sequence-level KD (Kim & Rush 2016: the student learns the teacher's beam-search outputs).

    ds-distill generate_targets --config=RUN.yaml --output_dir=DIR [--num_beams=5] [--max_new_tokens=128]
    deepspeed --num_gpus 8 --module ds_distill generate_targets --config=RUN.yaml --output_dir=DIR
    ds-distill distill --config=RUN.yaml --data.dataset=json --data.data_files.train=DIR/train.jsonl \\
        --data.data_files.validation=DIR/validation.jsonl --data.targets=teacher        # or both

DIR/train.jsonl holds the run's training examples as its data gives them (JSON lines, in the data's order, after
data.max_train_samples), each with the field `teacher_target`: the teacher's output for its source (translation,
seq2seq), its continuation of the prompt (causal_lm with data.prompt_field) or its reply in place of each
conversation's last assistant turn (data.messages_field);
DIR/validation.jsonl the validation split unchanged (evaluation scores against the references). Every rank
generates shards of its own (DIR/shards/part_*.jsonl; a ZeRO-3 teacher generates with the ranks in step), a
killed run started again generates only the missing ones, and DIR/targets.json records the teacher, the data
settings, a digest of the tokenized sources and the generation settings.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ds_distill import dist, models
from ds_distill.config import deepspeed as ds_config
from ds_distill.config.run import TEACHER_TARGET, RunConfig, cross_tokenizer
from ds_distill.data import batches, conversations
from ds_distill.data import tokenized as data
from ds_distill.errors import ConfigError
from ds_distill.train import on_policy, shards
from ds_distill.train.prepare import prepare
from ds_distill.train.teacher import load_teacher
from ds_distill.train.teacher_cache import split_digest, teacher_identity

MANIFEST = "targets.json"


@dataclasses.dataclass
class GenerationSettings:
    num_beams: int = 5
    max_new_tokens: int = 128
    batch_size: int = 16
    shard_examples: int = 1024

    def check(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            if value < 1:
                raise ConfigError(f"--{name} must be at least 1")


def part_path(directory: Path, shard: int) -> Path:
    return directory / "shards" / f"part_{shard:05d}.jsonl"


def write_targets(run: RunConfig, directory: Path, settings: GenerationSettings, overwrite: bool = False) -> Path:
    """Writes (or finishes) DIR/train.jsonl with the teacher's outputs; returns its path."""
    if cross_tokenizer(run):
        raise ConfigError("generate_targets does not work across tokenizers yet (losses.kd.cross_tokenizer)")
    dist.init(run.train.ddp_timeout)
    if not run.data.generates_from_sources():
        raise ConfigError(
            "generate_targets needs sources to continue: translation or seq2seq data, or causal_lm with "
            "data.prompt_field or data.messages_field"
        )
    if not run.teacher.model_name_or_path:
        raise ConfigError("generate_targets needs teacher.model_name_or_path")
    settings.check()
    # the sources as the data gives them, whatever targets a run would train on
    run = dataclasses.replace(
        run,
        teacher=dataclasses.replace(run.teacher, cache=None),
        data=dataclasses.replace(run.data, targets="references"),
    )
    p = prepare(run, claim=False)
    split = p.datasets[run.data.train_split]
    manifest = {
        "teacher": {"model_name_or_path": run.teacher.model_name_or_path, **teacher_identity(run, p.teacher_config)},
        "data": json.loads(json.dumps(data.describe(run.data, p.tokenizer))),
        "train_examples": len(split),
        "train_split_sha256": split_digest(split),
        **dataclasses.asdict(settings),
        "shards": -(-len(split) // settings.shard_examples),
        "complete": False,
    }
    pending = shards.claim(directory, MANIFEST, manifest, lambda s: part_path(directory, s),
                           "generated targets", overwrite)  # fmt: skip
    if dist.is_main():
        (directory / "shards").mkdir(exist_ok=True)
    chats = None
    if run.data.messages_field:  # continued as the data holds them, not as block_size cut them
        raw = data.load_raw(run.data)[run.data.train_split]
        chats = data.limited(run.data, run.data.train_split, raw)[run.data.messages_field]
    teacher = load_teacher(models.teacher_weights(run.teacher), p.teacher_ds)
    try:
        _generate_shards(teacher, p, split, chats, directory, settings, pending, manifest["shards"])
    finally:
        teacher.destroy()
    if dist.is_main():
        _assemble(run, directory, manifest["shards"])
        manifest["complete"] = True
        shards.write_manifest(directory / MANIFEST, manifest)
        validation = " --data.data_files.validation=" + str(directory / "validation.jsonl")
        if not (directory / "validation.jsonl").is_file():
            validation = ""
        print(f"wrote the teacher's outputs for {len(split):,} training examples to {directory / 'train.jsonl'}; "
              f"train on them with --data.dataset=json --data.data_files.train={directory / 'train.jsonl'}"
              f"{validation} --data.targets=teacher (or both)")  # fmt: skip
    dist.barrier()
    return directory / "train.jsonl"


def _generate_shards(teacher, p, split, chats, directory: Path, settings: GenerationSettings, pending,
                     total) -> None:  # fmt: skip
    """Each rank's shards, round by round (`shards.rounds`), its `generate` calls in step with the other ranks'
    (`shards.in_step`). `chats`: the split's conversations (data.messages_field), else None."""
    pad = batches.make_collator(p.run.data, p.tokenizer)
    decoder_only = p.run.data.task == "causal_lm"  # prompted: continued after their left padding
    lengths = batches.example_lengths(split)
    synced = ds_config.zero_stage(p.teacher_ds) == 3 and dist.world_size() > 1
    stand_in = [0]
    end = on_policy.end_ids(p.tokenizer, teacher.module.generation_config)  # a chat model lists several
    progress = tqdm(total=total, initial=total - len(pending), desc="generate_targets", unit="shard",
                    disable=not dist.is_main(), dynamic_ncols=True)  # fmt: skip
    for mine, finished in shards.rounds(pending):
        groups = []
        if mine is not None:
            groups = shards.batches(mine, settings.shard_examples, len(split), lengths, settings.batch_size)
        texts: dict[int, str] = {}
        for group in shards.in_step(groups):
            rows = [split[i] for i in group or stand_in]
            if chats is not None:
                replied = [conversations.reply_prompt(p.tokenizer, chats[i]) for i in group or stand_in]
                sources = batches.left_padded(replied, p.tokenizer.pad_token_id)
            elif decoder_only:
                sources = batches.left_padded(batches.prompts(pad(rows)), p.tokenizer.pad_token_id)
            else:
                sources = pad([{key: row[key] for key in ("input_ids", "attention_mask")} for row in rows])
            with torch.no_grad():
                outputs = teacher.module.generate(
                    input_ids=sources["input_ids"].to(teacher.device),
                    attention_mask=sources["attention_mask"].to(teacher.device),
                    num_beams=settings.num_beams,
                    max_new_tokens=settings.max_new_tokens,
                    pad_token_id=p.tokenizer.pad_token_id,
                    eos_token_id=end or None,
                    synced_gpus=synced,
                )
            if decoder_only:  # the continuation only
                outputs = outputs[:, sources["input_ids"].shape[1] :]
            if group:
                texts.update(zip(group, p.tokenizer.batch_decode(outputs, skip_special_tokens=True)))
        if mine is not None:
            lines = "".join(json.dumps({"index": i, TEACHER_TARGET: texts[i]}, ensure_ascii=False) + "\n"
                            for i in sorted(texts))  # fmt: skip
            shards.write_atomically(part_path(directory, mine), lambda tmp, text=lines: tmp.write_text(text))
        progress.update(finished)
    progress.close()
    dist.barrier()


def _assemble(run: RunConfig, directory: Path, total: int) -> None:
    """train.jsonl: each training example as the data gives it, with the teacher's output added;
    validation.jsonl: the validation split as it is."""
    texts = {}
    for shard in range(total):
        for line in part_path(directory, shard).read_text().splitlines():
            row = json.loads(line)
            texts[row["index"]] = row[TEACHER_TARGET]
    raw = data.load_raw(run.data)
    train = data.limited(run.data, run.data.train_split, raw[run.data.train_split])
    with_targets = ({**row, TEACHER_TARGET: texts[i]} for i, row in enumerate(train))
    _write_jsonl(directory / "train.jsonl", with_targets)
    if run.data.validation_split in raw:
        _write_jsonl(directory / "validation.jsonl", iter(raw[run.data.validation_split]))


def _write_jsonl(path: Path, rows) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w") as out:
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")

    shards.write_atomically(path, write)
