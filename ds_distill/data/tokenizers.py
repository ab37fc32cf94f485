"""The run's one tokenizer: where it comes from, loading it, checking that teacher and student share it and that it
knows the training text (a seeded sample of tokenized rows, either side of a pair); a sentencepiece tokenizer
trained on local text for demos and tests."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import datasets
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ds_distill import dist
from ds_distill.config.run import DataConfig, RunConfig, cross_tokenizer
from ds_distill.errors import ConfigError

# Shares of the sampled training tokens that may be the unknown token: above the first a run warns, above the
# second it stops (a mismatched or broken tokenizer; transformers 5 builds a 4-token T5Tokenizer from vocab_file=).
UNKNOWN_TOKEN_WARN_SHARE = 0.02
UNKNOWN_TOKEN_ERROR_SHARE = 0.20
UNKNOWN_TOKEN_SAMPLE_ROWS = 256


def tokenizer_source(run: RunConfig, teacher: Callable[[], str | None]) -> str:
    """Where the run's (the student's) tokenizer comes from: data.tokenizer, else the teacher's (`teacher()`: what
    the teacher loads from, `models.teacher_weights`; asked only where needed, since a GGUF teacher converts on
    first use), else the student's. Where the student has a vocabulary of
    its own (`student.init.from_teacher.tokenizer`) or the run distills across tokenizers
    (`losses.kd.cross_tokenizer`): data.tokenizer, else the student's own, else (a student cut from the teacher
    with its vocabulary) the teacher's."""
    dims = run.student.init.from_teacher
    own = dims.tokenizer if dims is not None else None
    if own or cross_tokenizer(run):
        return run.data.tokenizer or own or run.student.model_name_or_path or teacher()
    return run.data.tokenizer or teacher() or run.student.model_name_or_path


def teacher_tokenizer(run: RunConfig, teacher: Callable[[], str | None]) -> PreTrainedTokenizerBase | None:
    """The teacher's own tokenizer (`teacher()`: what the teacher loads from) where the run distills across
    tokenizers (`losses.kd.cross_tokenizer`), else None (the run's one tokenizer serves both models)."""
    if cross_tokenizer(run) and run.teacher.model_name_or_path:
        return load_tokenizer(teacher())
    return None


def train_like(tokenizer: PreTrainedTokenizerBase, texts: list[str], vocab_size: int) -> PreTrainedTokenizerBase:
    """A tokenizer of `tokenizer`'s kind (normaliser, pre-tokenizer, model, special tokens) with `vocab_size`
    pieces learned from `texts` by the `tokenizers` library."""
    if not tokenizer.is_fast:
        raise ConfigError(f"{tokenizer.name_or_path}: a slow {type(tokenizer).__name__} cannot be retrained; "
                          "give a fast tokenizer (data.tokenizer)")  # fmt: skip
    trained = tokenizer.train_new_from_iterator(texts, vocab_size=vocab_size)
    if trained.pad_token is None:
        trained.pad_token = trained.eos_token
    return trained


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


def unknown_token_share(rows: list[list[int]], unk_token_id: int) -> float:
    """The share of the tokens in `rows` (token ids, one list per row) that are `unk_token_id`."""
    tokens = sum(len(row) for row in rows)
    return sum(row.count(unk_token_id) for row in rows) / tokens if tokens else 0.0


def check_unknown_tokens(data: DataConfig, tokenizer, train: datasets.Dataset) -> None:
    """Warns when more than UNKNOWN_TOKEN_WARN_SHARE of a seeded sample of the tokenized training rows is the
    unknown token, on either side of a pair, and refuses more than UNKNOWN_TOKEN_ERROR_SHARE. Reads the ids
    (prepared data has no text at hand). Skipped for tokenizers without a distinct unknown token: GPT-2's is
    its EOS, the separator between packed documents, and byte-level vocabularies never need one."""
    unk = tokenizer.unk_token_id
    framing = {tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.sep_token_id}
    if unk is None or unk in framing or len(train) == 0:
        return
    if data.task == "translation":
        sides = {"input_ids": f"source ({data.source_lang})", "labels": f"target ({data.target_lang})"}
    elif data.task == "seq2seq":
        sides = {"input_ids": f"source ({data.source_field})", "labels": f"target ({data.target_field})"}
    else:
        sides = {"input_ids": f"text ({data.text_field})"}
    rows = random.Random(0).sample(range(len(train)), min(len(train), UNKNOWN_TOKEN_SAMPLE_ROWS))
    sample = train.select(sorted(rows))
    for column, side in sides.items():
        share = unknown_token_share(sample[column], unk)
        where = f"{share:.1%} of the {side} tokens of a training sample are {tokenizer.unk_token}"
        if share > UNKNOWN_TOKEN_ERROR_SHARE:
            raise ConfigError(
                f"{where} under tokenizer {tokenizer.name_or_path} ({len(tokenizer)} tokens): a mismatched or "
                "broken tokenizer; set data.tokenizer to the one the models were trained with"
            )
        if share > UNKNOWN_TOKEN_WARN_SHARE:
            dist.print_main(f"warning: {where} under tokenizer {tokenizer.name_or_path}; is it the right tokenizer?")
