"""Datasets to tokenized batches for translation, seq2seq, causal LM and masked LM tasks.

Text is read with `datasets.load_dataset` (a hub name, or `json`/`csv`/`parquet`/`text` with `data_files`),
tokenized once (the `datasets` cache keeps the result; rank 0 tokenizes while the other ranks wait), padded
per batch by the Hugging Face collators, and served in a seeded order that can restart at any micro-batch,
which is what makes resumed runs equal to uninterrupted ones.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler
from transformers import (
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
    default_data_collator,
)

from ds_distill import dist
from ds_distill.config import DataConfig
from ds_distill.errors import ConfigError
from ds_distill.losses.base import IGNORE_INDEX

FILE_BUILDERS = ("json", "csv", "parquet", "text")


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ConfigError(f"no tokenizer at '{path}' ({str(error).splitlines()[0]}); set data.tokenizer") from None
    if tokenizer.pad_token is None:  # GPT-2 and Llama ship without one; padded positions are masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def train_sentencepiece_tokenizer(jsonl: str | Path, languages: tuple[str, ...], directory: Path, vocab_size: int):
    """A sentencepiece unigram model on the given sides of a translation JSONL file, saved in `directory` as a
    T5 tokenizer (pad 0, eos 1, unk 2, no sentinel tokens). For demos and tests that cannot download one."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    text = directory / "corpus.txt"
    with open(text, "w") as out:
        for line in open(jsonl):
            pair = json.loads(line)["translation"]
            out.writelines(pair[lang] + "\n" for lang in languages)
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(directory / "spiece"),
        vocab_size=vocab_size,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    text.unlink()
    tokenizer = T5Tokenizer.from_pretrained(directory, extra_ids=0)
    tokenizer.save_pretrained(directory)
    return tokenizer


def check_same_tokenizer(teacher_path: str, student_path: str) -> None:
    """Refuses a teacher and a student whose tokenizers differ: their logits would not be comparable."""
    teacher, student = load_tokenizer(teacher_path), load_tokenizer(student_path)
    if teacher.get_vocab() != student.get_vocab():
        raise ConfigError(
            f"the teacher's tokenizer ({teacher_path}, {len(teacher)} tokens) and the student's ({student_path}, "
            f"{len(student)} tokens) differ; logit distillation needs one vocabulary. Build the student from the "
            "teacher (student.init.from_teacher) or give both the same tokenizer"
        )


def load_raw(data: DataConfig) -> datasets.DatasetDict:
    """Loads the configured splits, with clear errors for missing files, splits and empty sets."""
    if data.dataset in FILE_BUILDERS:
        if not data.data_files:
            raise ConfigError(
                f"data.dataset '{data.dataset}' reads local files: set data.data_files.train (and validation)"
            )
        for split, paths in data.data_files.items():
            for path in [paths] if isinstance(paths, str) else paths:
                if not Path(path).is_file():
                    raise ConfigError(f"data.data_files.{split}: file {path} does not exist")
    try:
        raw = datasets.load_dataset(data.dataset, data.dataset_config_name, data_files=data.data_files)
    except (FileNotFoundError, ConnectionError, ValueError) as error:
        reason = str(error).splitlines()[0]
        if "corresponds to no data" in reason:  # what `datasets` says when a split's files hold no rows
            raise ConfigError(f"dataset '{data.dataset}' is empty: {reason}; check data.data_files") from None
        raise ConfigError(f"cannot load data.dataset '{data.dataset}': {reason}") from None
    wanted = [s for s in (data.train_split, data.validation_split) if s]
    for split in wanted:
        if split not in raw:
            raise ConfigError(f"dataset '{data.dataset}' has no split '{split}' (it has {', '.join(raw)})")
        if len(raw[split]) == 0:
            raise ConfigError(f"split '{split}' of dataset '{data.dataset}' is empty")
    return datasets.DatasetDict({s: raw[s] for s in wanted})


def _check_fields(dataset: datasets.Dataset, fields: list[str], split: str) -> None:
    columns = dataset.column_names
    for name in fields:
        if name not in columns:
            raise ConfigError(f"split '{split}' has no field '{name}' (fields: {', '.join(columns)}); set data.*_field")


def _translation_pairs(data: DataConfig, dataset: datasets.Dataset, split: str):
    _check_fields(dataset, ["translation"], split)
    first = dataset[0]["translation"]
    for lang in (data.source_lang, data.target_lang):
        if lang not in first:
            raise ConfigError(f"translation pairs have languages {', '.join(first)}, not '{lang}'; fix data.*_lang")

    def pairs(batch):
        return [t[data.source_lang] for t in batch["translation"]], [t[data.target_lang] for t in batch["translation"]]

    return pairs


def _tokenize_seq2seq(data: DataConfig, tokenizer, dataset: datasets.Dataset, split: str) -> datasets.Dataset:
    if data.task == "translation":
        pairs = _translation_pairs(data, dataset, split)
    else:
        _check_fields(dataset, [data.source_field, data.target_field], split)

        def pairs(batch):
            return batch[data.source_field], batch[data.target_field]

    def tokenize(batch):
        sources, targets = pairs(batch)
        features = tokenizer([data.prefix + s for s in sources], max_length=data.max_source_length, truncation=True)
        features["labels"] = tokenizer(text_target=targets, max_length=data.max_target_length, truncation=True)[
            "input_ids"
        ]
        return features

    return dataset.map(
        tokenize,
        batched=True,
        remove_columns=dataset.column_names,
        num_proc=data.preprocessing_num_workers,
        desc=f"tokenizing {split}",
    )


def _tokenize_text(data: DataConfig, tokenizer, dataset: datasets.Dataset, split: str) -> datasets.Dataset:
    _check_fields(dataset, [data.text_field], split)
    dataset = dataset.filter(lambda row: bool(row[data.text_field].strip()), desc=f"dropping empty lines of {split}")
    if data.task == "masked_lm":

        def tokenize(batch):
            return tokenizer(
                batch[data.text_field],
                max_length=data.max_source_length,
                truncation=True,
                return_special_tokens_mask=True,
            )

        return dataset.map(
            tokenize,
            batched=True,
            remove_columns=dataset.column_names,
            num_proc=data.preprocessing_num_workers,
            desc=f"tokenizing {split}",
        )

    block = data.block_size

    def tokenize_and_pack(batch):
        # Concatenate documents (each ended by EOS) and cut into equal blocks, as run_clm.py does.
        ids = [
            token
            for text in batch[data.text_field]
            for token in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        ]
        usable = len(ids) // block * block
        blocks = [ids[i : i + block] for i in range(0, usable, block)]
        # Labels are the inputs (the model's logits are shifted against them later); blocks hold no padding,
        # so EOS stays a target even where a tokenizer pads with EOS.
        return {"input_ids": blocks, "attention_mask": [[1] * block for _ in blocks], "labels": [b[:] for b in blocks]}

    return dataset.map(
        tokenize_and_pack,
        batched=True,
        remove_columns=dataset.column_names,
        num_proc=data.preprocessing_num_workers,
        desc=f"packing {split} into blocks of {block}",
    )


def tokenize(data: DataConfig, tokenizer, raw: datasets.DatasetDict) -> datasets.DatasetDict:
    """Tokenizes every split; rank 0 first so the other ranks read its cache instead of redoing the work."""
    limits = {data.train_split: data.max_train_samples, data.validation_split: data.max_eval_samples}
    out = {}
    with dist.main_process_first():
        for split, dataset in raw.items():
            if limits.get(split):
                dataset = dataset.select(range(min(limits[split], len(dataset))))
            fn = _tokenize_seq2seq if data.task in ("translation", "seq2seq") else _tokenize_text
            out[split] = fn(data, tokenizer, dataset, split)
            if len(out[split]) == 0:
                raise ConfigError(
                    f"split '{split}' is empty after tokenization (block_size {data.block_size} too large?)"
                )
    return datasets.DatasetDict(out)


def make_collator(data: DataConfig, tokenizer, model: torch.nn.Module | None = None):
    """Dynamic padding; for seq2seq, `model` turns labels into decoder inputs its own way (T5 vs BART)."""
    if data.task in ("translation", "seq2seq"):
        return DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")
    if data.task == "causal_lm":
        return default_data_collator
    if data.mlm_probability > 0:
        return DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=data.mlm_probability)
    return DataCollatorWithPadding(tokenizer)


def batches_per_epoch(num_examples: int, batch_size: int) -> int:
    """Micro-batches each rank gets per epoch (drop_last); at least one, or a `ConfigError`."""
    batches = num_examples // dist.world_size() // batch_size
    if batches == 0:
        raise ConfigError(
            f"the training set has {num_examples} examples, fewer than one batch of {batch_size} per rank on "
            f"{dist.world_size()} ranks; lower train.per_device_train_batch_size or add data"
        )
    return batches


class _Batches(torch.utils.data.Dataset):
    """Item g is micro-batch g of an epoch, collated where it is fetched (in a DataLoader worker, if any).

    Random collators (masked LM) draw from a generator seeded by (seed, rank, epoch, g): a batch's masks do
    not depend on which worker made it or on what was drawn before, so a resumed run sees the same masks.
    """

    def __init__(self, dataset, batches: list[list[int]], collate, key: tuple[int, ...]):
        self.dataset, self.batches, self.collate, self.key = dataset, batches, collate, key

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, g: int) -> dict[str, torch.Tensor]:
        if hasattr(self.collate, "generator"):
            seed = np.random.SeedSequence([*self.key, g]).generate_state(1, np.uint64)[0]
            self.collate.generator = torch.Generator().manual_seed(int(seed))
        return self.collate([self.dataset[i] for i in self.batches[g]])


@dataclass
class TrainBatches:
    """The training stream for one rank: seeded, epoch after epoch, restartable at any micro-batch.

    Every rank gets the same number of micro-batches per epoch (drop_last), because the teacher's ZeRO-3
    forward is collective: a rank that ran one batch fewer would hang the others. `num_workers` processes
    collate ahead of the loop (pinned memory, so copies to the GPU can overlap compute).
    """

    dataset: datasets.Dataset
    collate: Any
    batch_size: int
    seed: int
    num_workers: int = 0
    pin_memory: bool = False

    def __post_init__(self):
        self.sampler = DistributedSampler(
            self.dataset, num_replicas=dist.world_size(), rank=dist.rank(), shuffle=True, seed=self.seed, drop_last=True
        )
        self.batches_per_epoch = batches_per_epoch(len(self.dataset), self.batch_size)

    def iterate(self, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Yields micro-batches forever, beginning after the first `start` ones."""
        epoch, skip = divmod(start, self.batches_per_epoch)
        while True:
            self.sampler.set_epoch(epoch)
            indices = list(self.sampler)[: self.batches_per_epoch * self.batch_size]
            batches = [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
            yield from DataLoader(
                _Batches(self.dataset, batches, self.collate, (self.seed, dist.rank(), epoch)),
                batch_size=None,  # items are whole micro-batches
                sampler=range(skip, len(batches)),
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                # a generator of its own: each DataLoader iterator draws a seed, and drawing it from the global
                # RNG would shift the dropout masks of a resumed run against the uninterrupted one
                generator=torch.Generator(),
            )
            epoch, skip = epoch + 1, 0


def eval_batches(dataset: datasets.Dataset, collate, batch_size: int) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
    """This rank's share of the evaluation set as (batch, number of real rows).

    Ranks get equal numbers of batches (ZeRO-3 needs every rank in every forward); the last batches are
    filled with repeats of example 0, and the count of real rows tells the caller to leave those out.
    """
    world, rank = dist.world_size(), dist.rank()
    per_rank = -(-len(dataset) // world)
    mine = list(range(rank, len(dataset), world))
    real = len(mine)
    mine += [0] * (per_rank - real)
    for start in range(0, per_rank, batch_size):
        chunk = mine[start : start + batch_size]
        yield collate([dataset[i] for i in chunk]), max(0, min(len(chunk), real - start))
