"""A tokenizer that turns the training text into unknown tokens is caught before any weights load: a warning
above 2% of a training sample's tokens, a ConfigError above 20%."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
from transformers import T5Tokenizer

from ds_distill import dist
from ds_distill.config.run import DataConfig, RunConfig
from ds_distill.config.typed import from_dict
from ds_distill.data import tokenized as data
from ds_distill.data import tokenizers
from ds_distill.errors import ConfigError
from ds_distill.train.loop import train_student
from ds_distill.train.prepare import prepare
from tests import tiny_models
from tests.conftest import causal_lm_config, refuse_weights, translation_config


def broken_tokenizer(tiny, directory: Path) -> Path:
    """What transformers 5 builds from `vocab_file=` alone: pad, eos, unk and the word boundary, nothing more."""
    tokenizer = T5Tokenizer(vocab_file=str(tiny["tokenizer"] / "spiece.model"), extra_ids=0)
    assert len(tokenizer) == 4
    tokenizer.save_pretrained(directory)
    return directory


def test_share_is_unknown_tokens_over_all_tokens_of_the_rows():
    rows = [[5, 2, 7, 1], [2, 2, 9, 1, 3, 4]]  # 3 of 10 tokens are id 2
    assert tokenizers.unknown_token_share(rows, unk_token_id=2) == 0.3
    assert tokenizers.unknown_token_share(rows, unk_token_id=8) == 0.0
    assert tokenizers.unknown_token_share([[]], unk_token_id=2) == 0.0


def test_a_tokenizer_that_knows_no_words_stops_the_run_before_weights_load(tiny, tmp_path, monkeypatch):
    refuse_weights(monkeypatch)
    monkeypatch.setattr(dist, "init", lambda *args: None)  # no process group needed to reach the check
    config = translation_config(tiny, tmp_path / "out", data={"tokenizer": str(broken_tokenizer(tiny, tmp_path / "b"))})
    with pytest.raises(ConfigError) as error:
        train_student(from_dict(RunConfig, config))
    message = str(error.value)
    assert re.match(
        r"\d+\.\d% of the source \(en\) tokens of a training sample are <unk> under tokenizer .*/b ", message
    )
    assert "(4 tokens): a mismatched or broken tokenizer" in message and "\n" not in message
    share = float(message.split("%")[0]) / 100
    assert share > tokenizers.UNKNOWN_TOKEN_ERROR_SHARE
    assert not (tmp_path / "out").exists()


def test_prepared_data_is_checked_without_tokenizing_again(tiny, tmp_path, monkeypatch):
    config = translation_config(tiny, tmp_path / "out", data={"tokenized_path": str(tmp_path / "tokenized")})
    data_config = from_dict(DataConfig, config["data"])
    tokenizer = tokenizers.load_tokenizer(str(broken_tokenizer(tiny, tmp_path / "b")))
    data.save_prepared(data_config, tokenizer, data.tokenize(data_config, tokenizer, data.load_raw(data_config)))
    monkeypatch.setattr(data, "tokenize", lambda *args: pytest.fail("prepared data must not be tokenized again"))
    with pytest.raises(ConfigError, match="of the source \\(en\\) tokens .* a mismatched or broken tokenizer"):
        data.load_tokenized(data_config, tokenizer)


def test_a_share_between_the_thresholds_warns_and_names_the_side(tiny, tmp_path, monkeypatch, capsys):
    refuse_weights(monkeypatch)
    lines = [json.loads(line)["translation"]["de"] for line in open(tiny_models.SHARED_DATA / "train.jsonl")][:120]
    files = {}
    for split in ("train", "validation"):
        files[split] = tmp_path / f"{split}.txt"
        # three words of characters the tokenizer never saw (one <unk> each) on every line
        files[split].write_text("".join(f"{line} 漢 字 語\n" for line in lines))
    config = causal_lm_config(tiny, tmp_path / "out", data={"data_files": {k: str(v) for k, v in files.items()}})
    prepared = prepare(from_dict(RunConfig, config))
    rows = prepared.datasets["train"]["input_ids"]
    assert len(rows) <= tokenizers.UNKNOWN_TOKEN_SAMPLE_ROWS  # the sample is every row
    share = tokenizers.unknown_token_share(rows, prepared.tokenizer.unk_token_id)
    assert tokenizers.UNKNOWN_TOKEN_WARN_SHARE < share < tokenizers.UNKNOWN_TOKEN_ERROR_SHARE
    assert (
        f"warning: {share:.1%} of the text (text) tokens of a training sample are <unk> under tokenizer "
        f"{tiny['gpt2']}; is it the right tokenizer?"
    ) in capsys.readouterr().out


def test_a_matching_tokenizer_passes_silently(tiny, tmp_path, capsys):
    prepared = prepare(from_dict(RunConfig, translation_config(tiny, tmp_path / "out")))
    assert "<unk>" not in capsys.readouterr().out
    unk = prepared.tokenizer.unk_token_id
    for column in ("input_ids", "labels"):
        assert (
            tokenizers.unknown_token_share(prepared.datasets["train"][column], unk)
            < tokenizers.UNKNOWN_TOKEN_WARN_SHARE
        )


def test_a_tokenizer_whose_unknown_token_is_its_eos_is_not_checked():
    gpt2_like = SimpleNamespace(unk_token_id=1, eos_token_id=1, bos_token_id=1, pad_token_id=1, sep_token_id=None)
    train = datasets.Dataset.from_dict({"input_ids": [[7, 1, 8, 1], [1, 1, 1, 1]]})  # EOS separates documents
    tokenizers.check_unknown_tokens(DataConfig(task="causal_lm"), gpt2_like, train)
