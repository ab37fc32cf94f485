"""Masked LM data: lines packed into full `[CLS] ... [SEP]` blocks (or one example per line), and evaluation
masks that are the same at every evaluation while training masks change from step to step."""

import itertools
import json

import pytest
import torch
from transformers import BertTokenizer

from ds_distill.config.load import load_config
from ds_distill.config.run import DataConfig
from ds_distill.data import batches, packing, tokenizers
from ds_distill.data import tokenized as data
from ds_distill.errors import ConfigError
from tests import tiny_models
from tests.conftest import translation_config, write_yaml

BLOCK = 64


def german_sentences() -> list[str]:
    lines = itertools.islice(open(tiny_models.SHARED_DATA / "train.jsonl"), 400)
    return [json.loads(line)["translation"]["de"] for line in lines]


@pytest.fixture(scope="module")
def bert():
    """A BERT WordPiece tokenizer whose words are single characters: a line of the sample is about 100 tokens."""
    chars = sorted({char for line in german_sentences() for char in line} - {" "})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{char}" for char in chars)]
    return BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=False, strip_accents=False)


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    """Train and validation text whose lines are five sentences each, several blocks of BLOCK tokens long."""
    directory = tmp_path_factory.mktemp("mlm_text")
    sentences = german_sentences()
    lines = [" ".join(sentences[i : i + 5]) for i in range(0, len(sentences), 5)]
    files = {"train": directory / "train.txt", "validation": directory / "validation.txt"}
    files["train"].write_text("\n".join(lines[:60]) + "\n")
    files["validation"].write_text("\n".join(lines[60:]) + "\n")
    return {split: str(path) for split, path in files.items()}


def mlm_config(text_files, **fields) -> DataConfig:
    return DataConfig(task="masked_lm", dataset="text", data_files=text_files, max_source_length=BLOCK, **fields)


def test_lines_are_packed_into_full_framed_blocks_that_hold_every_token(bert, text_files):
    rows = data.tokenize(mlm_config(text_files), bert, data.load_raw(mlm_config(text_files)))["train"]
    lines = open(text_files["train"]).read().splitlines()
    assert len(bert(lines[0], add_special_tokens=False)["input_ids"]) > 3 * BLOCK  # a line of several blocks

    assert {len(ids) for ids in rows["input_ids"]} == {BLOCK}
    assert all(ids[0] == bert.cls_token_id and ids[-1] == bert.sep_token_id for ids in rows["input_ids"])
    # inside the frames: all the lines' tokens in order, each line ended by [SEP], up to the last full block
    joined = [token for line in lines for token in bert(line, add_special_tokens=False)["input_ids"] + [3]]
    inner = [token for ids in rows["input_ids"] for token in ids[1:-1]]
    assert inner == joined[: len(inner)] and len(joined) - len(inner) < BLOCK - 2
    specials = {bert.cls_token_id, bert.sep_token_id}
    assert rows["special_tokens_mask"] == [[int(t in specials) for t in ids] for ids in rows["input_ids"]]
    assert rows["token_type_ids"] == [[0] * BLOCK] * len(rows)


def test_blocks_take_the_special_tokens_of_the_tokenizer(tiny, bert):
    t5 = tokenizers.load_tokenizer(str(tiny["tokenizer"]))  # sentencepiece, no [CLS]: a block ends with </s>
    assert packing.special_frame(bert) == ([bert.cls_token_id], [bert.sep_token_id])
    assert packing.special_frame(t5) == ([], [t5.eos_token_id])
    config = DataConfig(task="masked_lm", dataset="text", data_files=tiny["text"], max_source_length=32)
    rows = data.tokenize(config, t5, data.load_raw(config))["train"]
    assert {len(ids) for ids in rows["input_ids"]} == {32}
    assert {ids[-1] for ids in rows["input_ids"]} == {t5.eos_token_id}


def test_line_by_line_keeps_one_example_per_line_cut_at_the_length(bert, text_files):
    config = mlm_config(text_files, line_by_line=True)
    rows = data.tokenize(config, bert, data.load_raw(config))["train"]
    lines = open(text_files["train"]).read().splitlines()
    expected = bert(lines, max_length=BLOCK, truncation=True, return_special_tokens_mask=True)
    assert rows["input_ids"] == expected["input_ids"]
    assert rows["special_tokens_mask"] == expected["special_tokens_mask"]


def test_prepared_data_records_line_by_line_for_masked_lm_only(bert, text_files):
    packed, by_line = (
        data.describe(mlm_config(text_files), bert),
        data.describe(mlm_config(text_files, line_by_line=True), bert),
    )
    assert packed["line_by_line"] is False and by_line["line_by_line"] is True
    assert "line_by_line" not in data.describe(DataConfig(task="causal_lm", dataset="text"), bert)


def test_line_by_line_is_refused_outside_masked_lm(tmp_path, tiny):
    run_yaml = write_yaml(tmp_path / "run.yaml", translation_config(tiny, tmp_path / "out"))
    with pytest.raises(ConfigError, match="data.line_by_line applies to masked_lm only"):
        load_config(str(run_yaml), overrides={"data.line_by_line": True})


def masked_rows(batch) -> dict[tuple[int, ...], tuple[bool, ...]]:
    """Each row of a masked batch as {its original tokens: which of them are targets}, padding left out."""
    rows = {}
    for ids, labels, attention in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        real = attention.bool()
        original = torch.where(labels != -100, labels, ids)[real]
        rows[tuple(original.tolist())] = tuple((labels[real] != -100).tolist())
    return rows


def evaluation(split, collate, batch_size: int) -> dict[tuple[int, ...], tuple[bool, ...]]:
    shares = batches.eval_batches(split, collate, batch_size)
    return {row: mask for batch, _, _ in shares for row, mask in masked_rows(batch).items()}


def test_evaluation_masks_the_same_tokens_every_time_while_training_masks_change(bert, text_files):
    config = mlm_config(text_files, mlm_probability=0.3)
    tokenized = data.tokenize(config, bert, data.load_raw(config))
    collate = batches.make_collator(config, bert)
    train = tokenized["train"].select(range(8))  # one batch per epoch: every step holds the same eight blocks
    stream = batches.TrainBatches(train, collate, batch_size=8, seed=3).iterate()

    steps, evaluations = [], []
    for batch in itertools.islice(stream, 2):  # evaluate after each step, as the trainer does
        steps.append(masked_rows(batch))
        evaluations.append(evaluation(tokenized["validation"], collate, batch_size=4))
    assert evaluations[0] == evaluations[1]
    assert len(evaluations[0]) == len(tokenized["validation"]) and any(any(m) for m in evaluations[0].values())
    assert steps[0].keys() == steps[1].keys() and steps[0] != steps[1]


def test_evaluation_masks_do_not_depend_on_the_batch_size(bert, text_files):
    config = mlm_config(text_files, mlm_probability=0.3, line_by_line=True)  # lines of many lengths: padding
    split = data.tokenize(config, bert, data.load_raw(config))["validation"]
    collate = batches.make_collator(config, bert)
    assert evaluation(split, collate, batch_size=3) == evaluation(split, collate, batch_size=16)
