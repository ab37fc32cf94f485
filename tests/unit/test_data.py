"""Batches: restartable training order, equal evaluation shares, tokenization per task."""

import itertools
import json

import pytest

from ds_distill.config.run import DataConfig
from ds_distill.data import batches, tokenizers
from ds_distill.data import tokenized as data
from tests import tiny_models


@pytest.fixture(scope="module")
def translation(tiny):
    config = DataConfig(
        task="translation",
        dataset="json",
        source_lang="en",
        target_lang="de",
        max_train_samples=64,
        data_files={
            "train": str(tiny_models.SHARED_DATA / "train.jsonl"),
            "validation": str(tiny_models.SHARED_DATA / "valid.jsonl"),
        },
    )
    tokenizer = tokenizers.load_tokenizer(str(tiny["tokenizer"]))
    return config, tokenizer, data.tokenize(config, tokenizer, data.load_raw(config))


def test_translation_rows_hold_source_and_target_ids(translation):
    config, tokenizer, tokenized = translation
    row = tokenized["train"][0]
    assert tokenizer.decode(row["labels"], skip_special_tokens=True).startswith("Es geht nicht an")
    assert row["input_ids"][-1] == tokenizer.eos_token_id
    assert len(tokenized["train"]) == 64 and len(tokenized["validation"]) == 50


def test_training_stream_restarts_exactly_where_it_stopped(translation):
    config, tokenizer, tokenized = translation
    stream = batches.TrainBatches(tokenized["train"], batches.make_collator(config, tokenizer), batch_size=4, seed=3)
    assert stream.batches_per_epoch == 16
    full = list(itertools.islice(stream.iterate(0), 40))  # crosses two epoch boundaries
    resumed = list(itertools.islice(stream.iterate(21), 19))
    for expected, got in zip(full[21:], resumed):
        assert expected["input_ids"].equal(got["input_ids"]) and expected["labels"].equal(got["labels"])
    first_epoch = {tuple(b["input_ids"][i].tolist()) for b in full[:16] for i in range(4)}
    assert len(first_epoch) == 64  # every example once per epoch
    assert not full[0]["input_ids"].equal(full[16]["input_ids"])  # reshuffled per epoch


def padded_positions(batch) -> tuple[int, int]:
    """(positions computed, real tokens) of a seq2seq batch."""
    real = int(batch["attention_mask"].sum()) + int((batch["labels"] != -100).sum())
    return batch["input_ids"].numel() + batch["labels"].numel(), real


def test_length_grouping_pads_less_and_still_restarts_exactly(translation):
    config, tokenizer, tokenized = translation
    collate = batches.make_collator(config, tokenizer)
    plain = batches.TrainBatches(tokenized["train"], collate, batch_size=4, seed=3)
    grouped = batches.TrainBatches(tokenized["train"], collate, batch_size=4, seed=3, group_by_length=True)
    epoch_plain, epoch_grouped = (list(itertools.islice(s.iterate(0), 16)) for s in (plain, grouped))
    rows = [
        {tuple(b["input_ids"][i][b["attention_mask"][i].bool()].tolist()) for b in epoch for i in range(4)}
        for epoch in (epoch_plain, epoch_grouped)
    ]
    assert rows[0] == rows[1] and len(rows[0]) == 64  # the same examples, once each, only batched differently
    padding = []
    for epoch in (epoch_plain, epoch_grouped):
        positions, real = map(sum, zip(*(padded_positions(b) for b in epoch)))
        padding.append(1 - real / positions)
    assert padding[1] < 0.5 * padding[0], padding
    lengths = [int(b["attention_mask"].sum(1).max()) for b in epoch_grouped]
    assert lengths != sorted(lengths, reverse=True)  # batches shuffled, not served longest first

    full = list(itertools.islice(grouped.iterate(0), 40))
    resumed = list(itertools.islice(grouped.iterate(21), 19))
    for expected, got in zip(full[21:], resumed):
        assert expected["input_ids"].equal(got["input_ids"]) and expected["labels"].equal(got["labels"])
    assert batches.example_lengths(tokenized["train"])[0] == len(tokenized["train"][0]["input_ids"]) + len(
        tokenized["train"][0]["labels"]
    )


def test_evaluation_share_counts_real_rows(translation):
    config, tokenizer, tokenized = translation
    shares = list(
        batches.eval_batches(tokenized["validation"], batches.make_collator(config, tokenizer), batch_size=16)
    )
    assert [real for _, _, real in shares] == [16, 16, 16, 2]
    raw = [json.loads(line)["translation"]["de"] for line in open(config.data_files["validation"])]
    assert [text for _, references, _ in shares for text in references][:50] == raw[:50]  # the texts themselves


def test_causal_lm_text_is_packed_into_blocks(tiny):
    config = DataConfig(task="causal_lm", dataset="text", block_size=32, data_files=tiny["text"])
    tokenizer = tokenizers.load_tokenizer(str(tiny["tokenizer"]))
    tokenized = data.tokenize(config, tokenizer, data.load_raw(config))
    assert {len(ids) for ids in tokenized["train"]["input_ids"]} == {32}
    batch = batches.make_collator(config, tokenizer)([tokenized["train"][0], tokenized["train"][1]])
    assert batch["labels"].equal(batch["input_ids"])


def test_masked_lm_masks_a_share_of_tokens(tiny):
    config = DataConfig(task="masked_lm", dataset="text", mlm_probability=0.3, data_files=tiny["text"])
    tokenizer = tokenizers.load_tokenizer(str(tiny["tokenizer"]))
    tokenized = data.tokenize(config, tokenizer, data.load_raw(config))
    collate = batches.make_collator(config, tokenizer)
    batch = next(batches.eval_batches(tokenized["train"], collate, batch_size=32))[0]
    masked = (batch["labels"] != -100).float().sum() / batch["attention_mask"].sum()
    assert 0.2 < masked < 0.4


def test_masks_of_a_micro_batch_do_not_depend_on_workers_or_where_the_stream_started(tiny):
    config = DataConfig(task="masked_lm", dataset="text", mlm_probability=0.3, data_files=tiny["text"])
    tokenizer = tokenizers.load_tokenizer(str(tiny["tokenizer"]))
    tokenized = data.tokenize(config, tokenizer, data.load_raw(config))["train"].select(range(64))
    collate = batches.make_collator(config, tokenizer)
    alone = batches.TrainBatches(tokenized, collate, batch_size=8, seed=3)
    with_workers = batches.TrainBatches(tokenized, collate, batch_size=8, seed=3, num_workers=2)
    full = list(itertools.islice(alone.iterate(0), 12))
    for reference, batch in zip(full[5:], itertools.islice(with_workers.iterate(5), 7)):
        assert reference["labels"].equal(batch["labels"]) and reference["input_ids"].equal(batch["input_ids"])
