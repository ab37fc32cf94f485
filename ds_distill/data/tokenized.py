"""Datasets to tokenized splits for translation, seq2seq, causal LM and masked LM tasks.

Text is read with `datasets.load_dataset` (a hub name, or `json`/`csv`/`parquet`/`text` with `data_files`) and
tokenized once per node (the `datasets` cache keeps the result; each node's local rank 0 tokenizes while the
others wait), or loaded as prepared ahead of a launch by `ds-distill prepare_data` (`data.tokenized_path`).
`batches.py` turns the splits into batches; `tokenizers.py` loads and checks the tokenizer.
"""

from __future__ import annotations

import json
import os
import shutil
from hashlib import sha256
from pathlib import Path
from typing import Any

import datasets

from ds_distill import dist
from ds_distill.config.paths import FILE_BUILDERS
from ds_distill.config.run import TEACHER_TARGET, DataConfig
from ds_distill.data import IGNORE_INDEX, conversations
from ds_distill.data.alignment import TEACHER_VIEW, token_bytes, token_ends
from ds_distill.data.packing import aligned_causal_lm_rows, causal_lm_rows, masked_lm_rows
from ds_distill.data.tokenizers import check_unknown_tokens
from ds_distill.errors import ConfigError


def load_raw(data: DataConfig, need_train: bool = True) -> datasets.DatasetDict:
    """Loads the training split and, where there is one, the validation split (or carves it out of the
    training split: `validation_split_percentage`), with clear errors for missing files, splits and empty sets.
    `need_train=False` (evaluation) accepts data without a training split."""
    if data.dataset in FILE_BUILDERS:
        if not data.data_files:
            raise ConfigError(
                f"data.dataset '{data.dataset}' reads local files: set data.data_files.train (and validation)"
            )
        for split, paths in data.data_files.items():
            for path in [paths] if isinstance(paths, str) else paths:
                if not Path(path).is_file():
                    raise ConfigError(f"data.data_files.{split}: file {path} does not exist")
                if Path(path).stat().st_size == 0:
                    raise ConfigError(f"data.data_files.{split}: file {path} is empty")
    try:
        raw = datasets.load_dataset(
            data.dataset, data.dataset_config_name, data_files=data.data_files, revision=data.revision
        )
    except datasets.exceptions.DatasetGenerationError as error:  # a file that does not parse, or layouts differ
        try:
            reason = _unreadable_files(data)
        except (OSError, UnicodeDecodeError):  # compressed files: datasets' own reason has to do
            reason = None
        raise ConfigError(reason or f"cannot read data.data_files: {_cause(error)}") from None
    except (FileNotFoundError, ConnectionError, ValueError, RuntimeError) as error:
        reason = str(error).splitlines()[0]
        if "corresponds to no data" in reason:  # what `datasets` says when a split's files hold no rows
            raise ConfigError(f"dataset '{data.dataset}' is empty: {reason}; check data.data_files") from None
        if "scripts are no longer supported" in reason:
            raise ConfigError(
                f"data.dataset '{data.dataset}' is a loading script, which datasets >= 4 does not run: use its "
                "Parquet conversion (data.revision: refs/convert/parquet), a dataset with data files, or local "
                "files (tools/prepare_wmt.py writes WMT pairs as JSON lines)"
            ) from None
        raise ConfigError(f"cannot load data.dataset '{data.dataset}': {reason}") from None
    if data.train_split not in raw and need_train:
        raise ConfigError(f"dataset '{data.dataset}' has no split '{data.train_split}' (it has {', '.join(raw)})")
    splits = {split: raw[split] for split in (data.train_split,) if split in raw}
    if data.validation_split in raw:
        splits[data.validation_split] = raw[data.validation_split]
    elif data.validation_split and data.validation_split_percentage and splits:
        # as Hugging Face's run_clm.py carves it: the first percent of the training split, the same every run
        train = splits[data.train_split]
        held_out = max(1, len(train) * data.validation_split_percentage // 100)
        splits = {data.train_split: train.select(range(held_out, len(train)))}
        splits[data.validation_split] = train.select(range(held_out))
    for split, dataset in splits.items():
        if len(dataset) == 0:
            raise ConfigError(f"split '{split}' of dataset '{data.dataset}' is empty")
    return datasets.DatasetDict(splits)


def _cause(error: BaseException) -> str:
    """The first line of the innermost cause of `error` (what `datasets` wraps in DatasetGenerationError)."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def _unreadable_files(data: DataConfig) -> str | None:
    """Why the local JSON-lines files of `data` cannot be read as one dataset: the first line of a file that is
    not a JSON object, or two files whose rows have different fields; None where neither is the reason (or the
    files are not JSON lines: a JSON array, a compressed file)."""
    if data.dataset != "json":
        return None
    fields = {}
    for split, paths in data.data_files.items():
        for path in [paths] if isinstance(paths, str) else paths:
            if not str(path).endswith(".jsonl"):
                return None
            with open(path) as lines:
                for number, line in enumerate(lines, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as error:
                        return f"data.data_files.{split}: {path}, line {number}: not a JSON object ({error.msg})"
                    if not isinstance(row, dict):
                        return f"data.data_files.{split}: {path}, line {number}: not a JSON object"
                    fields.setdefault(split, (path, sorted(row)))
    layouts = {tuple(names) for _, names in fields.values()}
    if len(layouts) > 1:
        described = "; ".join(f"{split} ({path}): {', '.join(names)}" for split, (path, names) in fields.items())
        return f"data.data_files hold rows of different fields, so they cannot be one dataset: {described}"
    return None


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
        rows = batch["translation"]
        for lang in (data.source_lang, data.target_lang):
            row = next((row for row in rows if not isinstance(row, dict) or row.get(lang) is None), None)
            if row is not None:
                raise ConfigError(f"split '{split}' has a row without '{lang}' text ({json.dumps(row)[:120]}); fix "
                                  "or drop such rows")  # fmt: skip
        return [t[data.source_lang] for t in rows], [t[data.target_lang] for t in rows]

    return pairs


def _seq2seq_features(data: DataConfig, tokenizer, sources: list[str], targets: list[str], pieces=None) -> dict:
    """Sources and targets as token ids; given `pieces` (each id's bytes, `alignment.token_bytes`), also where
    each target token ends (`label_ends`)."""
    features = tokenizer([data.prefix + s for s in sources], max_length=data.max_source_length, truncation=True)
    labels = tokenizer(text_target=targets, max_length=data.max_target_length, truncation=True,
                       return_offsets_mapping=pieces is not None)  # fmt: skip
    features["labels"] = labels["input_ids"]
    if pieces is not None:
        features["label_ends"] = [token_ends(offsets, text, [pieces[i] for i in ids])
                                  for offsets, text, ids in zip(labels["offset_mapping"], targets, labels["input_ids"])]  # fmt: skip
    return dict(features)


def _prompted_features(data: DataConfig, tokenizer, prompts: list[str], completions: list[str], pieces=None) -> dict:
    """Prompt + completion + EOS per row, targets on the completion and EOS (and `label_ends`, given `pieces`)."""
    prompt_ids = tokenizer(prompts)["input_ids"]
    encoded = tokenizer(completions, add_special_tokens=False, return_offsets_mapping=pieces is not None)
    rows = {"input_ids": [], "attention_mask": [], "labels": [], **({"label_ends": []} if pieces is not None else {})}
    for index, (prompt, completion) in enumerate(zip(prompt_ids, encoded["input_ids"])):
        ids = (prompt + completion + [tokenizer.eos_token_id])[: data.block_size]
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * len(ids))
        rows["labels"].append(([IGNORE_INDEX] * len(prompt) + completion + [tokenizer.eos_token_id])[: len(ids)])
        if pieces is not None:  # EOS has no text: it ends where the completion does
            offsets = [*encoded["offset_mapping"][index], (0, 0)]
            ends = token_ends(offsets, completions[index], [pieces[i] for i in completion] + [None])
            rows["label_ends"].append(ends[: max(0, len(ids) - len(prompt))])
    return rows


def _views(make, data: DataConfig, tokenizer, teacher_tokenizer=None):
    """fn(*texts) -> the rows as `make` tokenizes them for the student and, given the teacher's tokenizer, for
    the teacher too (`TEACHER_VIEW` columns, and each side's `label_ends`)."""
    if teacher_tokenizer is None:
        return lambda *texts: make(data, tokenizer, *texts)
    pieces = token_bytes(tokenizer), token_bytes(teacher_tokenizer)

    def both(*texts):
        teacher = make(data, teacher_tokenizer, *texts, pieces=pieces[1])
        return {**make(data, tokenizer, *texts, pieces=pieces[0]),
                **{TEACHER_VIEW + key: value for key, value in teacher.items()}}  # fmt: skip

    return both


def _map_rows(data: DataConfig, dataset: datasets.Dataset, fn, desc: str) -> datasets.Dataset:
    """`fn` (a batch of rows -> their tokenized columns) over the split, its own columns replaced."""
    return dataset.map(fn, batched=True, remove_columns=dataset.column_names, num_proc=_workers(data, len(dataset)),
                       desc=desc)  # fmt: skip


def _tokenize_seq2seq(
    data: DataConfig, tokenizer, dataset: datasets.Dataset, split: str, teacher_tokenizer=None
) -> datasets.Dataset:
    if data.task == "translation":
        pairs = _translation_pairs(data, dataset, split)
    else:
        _check_fields(dataset, [data.source_field, data.target_field], split)

        def pairs(batch):
            return batch[data.source_field], batch[data.target_field]

    training = split == data.train_split
    if training and data.targets != "references":
        _check_fields(dataset, [TEACHER_TARGET], split)

    views = _views(_seq2seq_features, data, tokenizer, teacher_tokenizer)

    def tokenize(batch):
        sources, targets = _targets(data, batch, *pairs(batch), training)
        features = views(sources, targets)
        if not training:  # generations are scored against the text itself, not decoded labels
            features["reference"] = targets
        return features

    return _map_rows(data, dataset, tokenize, f"tokenizing {split}")


def _targets(data: DataConfig, batch: dict, sources: list[str], targets: list[str], training: bool):
    """(sources, targets) of a batch of rows as the run trains on them (`data.targets`): the data's, the
    teacher's (`teacher_target`), or each source twice, with both."""
    if training and data.targets == "teacher":
        return sources, batch[TEACHER_TARGET]
    if training and data.targets == "both":
        return [s for s in sources for _ in range(2)], [t for pair in zip(targets, batch[TEACHER_TARGET]) for t in pair]
    return sources, targets


def _tokenize_prompted(
    data: DataConfig, tokenizer, dataset: datasets.Dataset, split: str, teacher_tokenizer=None
) -> datasets.Dataset:
    """causal_lm with prompts: one example per row, prompt + completion + EOS cut at block_size, targets only on
    the completion and EOS."""
    training = split == data.train_split
    _check_fields(dataset, [data.prompt_field, data.text_field] + ([TEACHER_TARGET] if training and
                  data.targets != "references" else []), split)  # fmt: skip

    views = _views(_prompted_features, data, tokenizer, teacher_tokenizer)

    def tokenize(batch):
        prompts, completions = _targets(data, batch, batch[data.prompt_field], batch[data.text_field], training)
        return views(prompts, completions)

    return _map_rows(data, dataset, tokenize, f"tokenizing {split}")


def _tokenize_conversations(data: DataConfig, tokenizer, dataset: datasets.Dataset, split: str) -> datasets.Dataset:
    """causal_lm conversations (data/conversations.py): one example per row, its assistant turns the targets;
    with the teacher's replies (`data.targets`) in place of, or beside, each last assistant turn."""
    training = split == data.train_split
    teacher = training and data.targets != "references"
    _check_fields(dataset, [data.messages_field] + ([TEACHER_TARGET] if teacher else []), split)
    conversations.check_template(tokenizer)
    conversations.check_rows(dataset[data.messages_field], f"split '{split}', data.{data.messages_field}")

    def tokenize(batch):
        rows = batch[data.messages_field]
        if teacher:
            replies = [conversations.with_reply(row, reply) for row, reply in zip(rows, batch[TEACHER_TARGET])]
            rows = replies if data.targets == "teacher" else [row for pair in zip(rows, replies) for row in pair]
        return conversations.conversation_features(tokenizer, rows, data.block_size)

    return _map_rows(data, dataset, tokenize, f"tokenizing {split} (chat template)")


def _tokenize_text(
    data: DataConfig, tokenizer, dataset: datasets.Dataset, split: str, teacher_tokenizer=None
) -> datasets.Dataset:
    if data.messages_field:  # across tokenizers refused before (train/prepare.py check_cross_tokenizer)
        return _tokenize_conversations(data, tokenizer, dataset, split)
    if data.prompt_field:
        return _tokenize_prompted(data, tokenizer, dataset, split, teacher_tokenizer)
    _check_fields(dataset, [data.text_field], split)
    dataset = dataset.filter(lambda row: bool(row[data.text_field].strip()), desc=f"dropping empty lines of {split}")
    if data.task == "masked_lm":
        rows = masked_lm_rows(data, tokenizer)
        blocks = "" if data.line_by_line else f" into blocks of {data.max_source_length}"
    else:
        rows = (causal_lm_rows(data, tokenizer) if teacher_tokenizer is None
                else aligned_causal_lm_rows(data, tokenizer, teacher_tokenizer))  # fmt: skip
        blocks = f" into blocks of {data.block_size}"
    return _map_rows(data, dataset, rows, f"tokenizing {split}{blocks}")


def texts(data: DataConfig, dataset: datasets.Dataset, split: str) -> list[str]:
    """Every text of a split the run tokenizes: sources and targets, prompts and completions, or the text."""
    if data.task == "translation":
        sources, targets = _translation_pairs(data, dataset, split)(dataset[:])
        return [*sources, *targets]
    if data.messages_field:
        _check_fields(dataset, [data.messages_field], split)
        return conversations.texts(dataset[data.messages_field])
    fields = {"seq2seq": [data.source_field, data.target_field]}.get(data.task) or [
        *([data.prompt_field] if data.prompt_field else []), data.text_field]  # fmt: skip
    _check_fields(dataset, fields, split)
    return [text for field in fields for text in dataset[field] if text]


def _workers(data: DataConfig, rows: int) -> int | None:
    """Processes for tokenizing: as configured, else one per 20,000 rows up to the machine's cores (only one
    process per node tokenizes; the others wait for its cache)."""
    if data.preprocessing_num_workers is not None:
        return data.preprocessing_num_workers
    workers = min(os.cpu_count() or 1, rows // 20_000)
    return workers if workers > 1 else None


def limited(data: DataConfig, split: str, dataset: datasets.Dataset) -> datasets.Dataset:
    """The split's first max_train_samples (or max_eval_samples) rows."""
    limit = {data.train_split: data.max_train_samples, data.validation_split: data.max_eval_samples}.get(split)
    return dataset.select(range(min(limit, len(dataset)))) if limit else dataset


def tokenize(data: DataConfig, tokenizer, raw: datasets.DatasetDict, teacher_tokenizer=None) -> datasets.DatasetDict:
    """Tokenizes every split (the caller holds `dist.local_main_first`, so each node tokenizes once); the
    training split also for the teacher, given its tokenizer (`TEACHER_VIEW`)."""
    out = {}
    for split, dataset in raw.items():
        dataset = limited(data, split, dataset)
        fn = _tokenize_seq2seq if data.task in ("translation", "seq2seq") else _tokenize_text
        out[split] = fn(data, tokenizer, dataset, split, teacher_tokenizer if split == data.train_split else None)
        if len(out[split]) == 0:
            length = "max_source_length" if data.task == "masked_lm" else "block_size"
            raise ConfigError(f"split '{split}' is empty after tokenization (data.{length} too large?)")
    return datasets.DatasetDict(out)


# -- tokenized data on disk (`ds-distill prepare_data`) ------------------------------------------------------

PREPARED_MARKER = "ds_distill_data.json"
# What tokenized data depends on, besides the tokenizer; a prepared copy is used only where all of it matches.
TOKENIZATION_KEYS = (
    "task", "dataset", "dataset_config_name", "data_files", "revision", "train_split", "validation_split",
    "validation_split_percentage", "source_lang", "target_lang", "prefix", "source_field", "target_field",
    "text_field", "max_source_length", "max_target_length", "block_size", "max_train_samples", "max_eval_samples",
)  # fmt: skip


def describe(data: DataConfig, tokenizer, teacher_tokenizer=None) -> dict[str, Any]:
    """The data settings and tokenizer(s) that tokenized data was made with (vocabulary digests, not paths)."""
    teacher = {"teacher_tokenizer": _tokenizer_digest(teacher_tokenizer)} if teacher_tokenizer is not None else {}
    # keys that most data leave at their defaults are described only where set, so that copies prepared before
    # they existed stay valid: line_by_line (masked_lm rows only), targets (other than the references), prompt_field
    masked_lm = {"line_by_line": data.line_by_line} if data.task == "masked_lm" else {}
    targets = {"targets": data.targets} if data.targets != "references" else {}
    prompts = {"prompt_field": data.prompt_field} if data.prompt_field else {}
    if data.messages_field:  # the rows are rendered by the chat template too
        template = sha256((tokenizer.chat_template or "").encode()).hexdigest()
        prompts = {"messages_field": data.messages_field, "chat_template_sha256": template}
    return {
        **prompts,
        **{key: getattr(data, key) for key in TOKENIZATION_KEYS},
        **masked_lm,
        **targets,
        **teacher,
        "tokenizer": _tokenizer_digest(tokenizer),
    }


def _tokenizer_digest(tokenizer) -> dict[str, str]:
    vocabulary = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return {"class": type(tokenizer).__name__, "vocabulary_sha256": sha256(vocabulary.encode()).hexdigest()}


def prepared(data: DataConfig, tokenizer, teacher_tokenizer=None) -> datasets.DatasetDict | None:
    """The tokenized splits at `data.tokenized_path`, if they were made with these settings; else None.
    A copy made with other settings is refused, naming what differs."""
    path = Path(data.tokenized_path) if data.tokenized_path else None
    if path is None or not (path / PREPARED_MARKER).is_file():
        return None
    saved = json.loads((path / PREPARED_MARKER).read_text())
    wanted = json.loads(
        json.dumps(describe(data, tokenizer, teacher_tokenizer))
    )  # as JSON would store it (tuples become lists)
    differ = sorted(key for key in set(wanted) | set(saved) if saved.get(key) != wanted.get(key))
    if differ:
        raise ConfigError(
            f"data.tokenized_path {path} was prepared with other settings ({', '.join(differ)} differ); run "
            "ds-distill prepare_data again or point data.tokenized_path elsewhere"
        )
    return datasets.load_from_disk(str(path))


def save_prepared(data: DataConfig, tokenizer, tokenized: datasets.DatasetDict, teacher_tokenizer=None) -> Path:
    """Writes the tokenized splits to `data.tokenized_path` (whole or not at all), with their description."""
    path = Path(data.tokenized_path)
    staging = path.with_name(path.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    tokenized.save_to_disk(str(staging))
    (staging / PREPARED_MARKER).write_text(json.dumps(describe(data, tokenizer, teacher_tokenizer), indent=2) + "\n")
    if path.exists():
        if not (path / PREPARED_MARKER).is_file():
            raise ConfigError(f"data.tokenized_path {path} holds files that are not prepared data; choose another")
        shutil.rmtree(path)
    staging.rename(path)
    return path


def load_tokenized(data: DataConfig, tokenizer, teacher_tokenizer=None) -> datasets.DatasetDict:
    """The tokenized splits: from `data.tokenized_path` when prepared there with these settings, else loaded
    and tokenized once per node (local rank 0 first, the other ranks then read its `datasets` cache), and
    saved to `data.tokenized_path` if one is set. Either way checked for unknown tokens."""
    ready = prepared(data, tokenizer, teacher_tokenizer)
    if ready is not None:
        check_unknown_tokens(data, tokenizer, ready[data.train_split])
        return ready
    with dist.local_main_first():
        tokenized = tokenize(data, tokenizer, load_raw(data), teacher_tokenizer)
    check_unknown_tokens(data, tokenizer, tokenized[data.train_split])
    if data.tokenized_path:
        if dist.is_main():
            save_prepared(data, tokenizer, tokenized, teacher_tokenizer)
        dist.barrier()
    return tokenized
