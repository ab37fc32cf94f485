"""Tokenized data to batches: collation, the restartable training stream of each rank, evaluation shares.

Batches are padded per batch by the Hugging Face collators (optionally of examples grouped by length) and served
in a seeded order that can restart at any micro-batch, which is what makes resumed runs equal to uninterrupted
ones. Masked LM masks differ at every training step, and are the same at every evaluation.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler
from transformers import (
    DataCollatorForLanguageModeling,
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
    default_data_collator,
)

from ds_distill import dist
from ds_distill.config.run import DataConfig
from ds_distill.data import IGNORE_INDEX
from ds_distill.errors import ConfigError


def make_collator(data: DataConfig, tokenizer, model: torch.nn.Module | None = None, rows_vary: bool = False):
    """Dynamic padding, on the right whatever side the tokenizer pads (chat tokenizers often ship left padding,
    for generation): a row's outputs then do not depend on the padding of the batch it is in, in a model with
    absolute positions too, so the teacher cache's rows are the online ones. For seq2seq, `model` turns labels
    into decoder inputs its own way (T5 vs BART). `rows_vary`: packed causal LM rows of different lengths (the
    teacher's tokens of a student's block, across tokenizers), padded like prompted ones."""
    if tokenizer.padding_side != "right":
        tokenizer = copy.copy(tokenizer)
        tokenizer.padding_side = "right"
    if data.task in ("translation", "seq2seq"):
        return DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")
    if data.task == "causal_lm" and (data.prompted() or rows_vary):  # rows of their own lengths, padded per batch
        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")
    if data.task == "causal_lm":
        return default_data_collator
    if data.mlm_probability > 0:
        return DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=data.mlm_probability)
    return DataCollatorWithPadding(tokenizer)


GROUP_WINDOW = 50  # batches whose examples are sorted by length together (as Hugging Face's LengthGroupedSampler)


def example_lengths(dataset: datasets.Dataset) -> np.ndarray:
    """Tokens per example (source + target for seq2seq), read from the Arrow columns without decoding rows."""
    import pyarrow.compute as pc

    table = dataset.with_format("arrow")[:]
    lengths = np.zeros(len(dataset), dtype=np.int64)
    for column in ("input_ids", "labels"):
        if column in table.column_names:
            lengths += pc.list_value_length(table[column]).to_numpy(zero_copy_only=False)
    return lengths


def group_by_length(indices: list[int], lengths: np.ndarray, batch_size: int, rng: np.random.Generator):
    """`indices` (a multiple of batch_size) as batches of similar lengths: each window of GROUP_WINDOW batches is
    sorted by length and cut into batches, and the batches of the epoch are then shuffled."""
    window = batch_size * GROUP_WINDOW
    batches = []
    for start in range(0, len(indices), window):
        chunk = sorted(indices[start : start + window], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


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

    def __init__(self, dataset, batches: list[list[int]], collate, key: tuple[int, ...], teacher_rows=None):
        self.dataset, self.batches, self.collate, self.key = dataset, batches, collate, key
        self.teacher_rows = teacher_rows

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, g: int) -> dict[str, torch.Tensor]:
        if hasattr(self.collate, "generator"):
            seed = np.random.SeedSequence([*self.key, g]).generate_state(1, np.uint64)[0]
            self.collate.generator = torch.Generator().manual_seed(int(seed))
        batch = self.collate([self.dataset[i] for i in self.batches[g]])
        batch["example_index"] = torch.tensor(self.batches[g])
        if self.teacher_rows is not None:
            batch.update(self.teacher_rows(batch))
        return batch


@dataclass
class TrainBatches:
    """The training stream for one rank: seeded, epoch after epoch, restartable at any micro-batch.

    Every rank gets the same number of micro-batches per epoch (drop_last), because the teacher's ZeRO-3
    forward is collective: a rank that ran one batch fewer would hang the others. `num_workers` processes
    collate ahead of the loop (pinned memory, so copies to the GPU can overlap compute). Each batch carries its
    examples' indices in the split (`example_index`) and, given `teacher_rows` (a teacher cache's reader), what
    it returns for the batch: read where the batch is collated, ahead of the loop.
    """

    dataset: datasets.Dataset
    collate: Any
    batch_size: int
    seed: int
    num_workers: int = 0
    pin_memory: bool = False
    group_by_length: bool = False
    teacher_rows: Any = None

    def __post_init__(self):
        self.sampler = DistributedSampler(
            self.dataset, num_replicas=dist.world_size(), rank=dist.rank(), shuffle=True, seed=self.seed, drop_last=True
        )
        self.batches_per_epoch = batches_per_epoch(len(self.dataset), self.batch_size)
        self.lengths = example_lengths(self.dataset) if self.group_by_length else None

    def iterate(self, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Yields micro-batches forever, beginning after the first `start` ones."""
        epoch, skip = divmod(start, self.batches_per_epoch)
        while True:
            self.sampler.set_epoch(epoch)
            indices = list(self.sampler)[: self.batches_per_epoch * self.batch_size]
            if self.lengths is not None:
                rng = np.random.default_rng([self.seed, epoch, dist.rank()])
                batches = group_by_length(indices, self.lengths, self.batch_size, rng)
            else:
                batches = [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
            yield from DataLoader(
                _Batches(self.dataset, batches, self.collate, (self.seed, dist.rank(), epoch), self.teacher_rows),
                batch_size=None,  # items are whole micro-batches
                sampler=range(skip, len(batches)),
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                # a generator of its own: each DataLoader iterator draws a seed, and drawing it from the global
                # RNG would shift the dropout masks of a resumed run against the uninterrupted one
                generator=torch.Generator(),
            )
            epoch, skip = epoch + 1, 0


EVAL_MASKING_SEED = 0  # not train.seed: runs with different seeds are scored on the same masked positions


class FixedMasks:
    """Masked LM collation for evaluation: example i of the set is masked by a generator seeded by i alone, so
    every evaluation masks the same positions with the same replacements (eval losses compare across steps and
    runs) whatever the batch size or the number of ranks. Examples are masked one at a time, then padded."""

    def __init__(self, collate: DataCollatorForLanguageModeling):
        self.masking = copy.copy(collate)  # its generator is ours to set; the training collator's is left alone
        self.pad = DataCollatorForSeq2Seq(
            collate.tokenizer,
            label_pad_token_id=IGNORE_INDEX,
            pad_to_multiple_of=collate.pad_to_multiple_of,
            return_tensors="pt",
        )

    def __call__(self, rows: list[dict[str, Any]], indices: list[int]) -> dict[str, torch.Tensor]:
        masked = []
        for row, index in zip(rows, indices):
            seed = np.random.SeedSequence([EVAL_MASKING_SEED, index]).generate_state(1, np.uint64)[0]
            self.masking.generator = torch.Generator().manual_seed(int(seed))
            masked.append({name: values[0].tolist() for name, values in self.masking([row]).items()})
        return self.pad(masked)


def eval_batches(
    dataset: datasets.Dataset, collate, batch_size: int
) -> Iterator[tuple[dict[str, torch.Tensor], list[str] | None, int]]:
    """This rank's share of the evaluation set as (batch, reference texts or None, number of real rows).

    Ranks get equal numbers of batches (ZeRO-3 needs every rank in every forward); the last batches are
    filled with repeats of example 0, and the count of real rows tells the caller to leave those out.
    A masking collator masks each example the same way at every evaluation (`FixedMasks`).
    """
    world, rank = dist.world_size(), dist.rank()
    per_rank = -(-len(dataset) // world)
    mine = list(range(rank, len(dataset), world))
    real = len(mine)
    mine += [0] * (per_rank - real)
    fixed = FixedMasks(collate) if isinstance(collate, DataCollatorForLanguageModeling) and collate.mlm else None
    for start in range(0, per_rank, batch_size):
        indices = mine[start : start + batch_size]
        rows = [dataset[i] for i in indices]
        references = [row.pop("reference") for row in rows] if "reference" in rows[0] else None
        batch = fixed(rows, indices) if fixed else collate(rows)
        yield batch, references, max(0, min(len(rows), real - start))


def left_padded(sequences: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Prompts for a decoder-only model to continue, padded on the left (so every row continues at the end):
    {"input_ids", "attention_mask"} [rows, longest]."""
    longest = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, ids in enumerate(sequences):
        if ids:
            input_ids[row, -len(ids) :] = torch.tensor(ids)
            attention_mask[row, -len(ids) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def prompts(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """Each row's prompt in a batch of prompted causal_lm examples: its tokens before its last run of targets
    (a completion, or a conversation's last assistant turn)."""
    out = []
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        targets = [label != IGNORE_INDEX for label in labels]
        last = max((i for i, target in enumerate(targets) if target), default=len(labels))
        while last > 0 and targets[last - 1]:
            last -= 1
        out.append(ids[:last])
    return out
