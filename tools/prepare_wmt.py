"""WMT sentence pairs into JSON lines in the layout ds_distill reads ({"translation": {"en": ..., "es": ...}}).

From the parallel text files that statmt.org ships for WMT (a corpus is a pair of line-aligned files
`NAME.en`, `NAME.es`; test sets may come as SGML, `newstest2013-src.en.sgm` / `newstest2013-ref.es.sgm`):

    python tools/prepare_wmt.py text --raw_dir=wmt13 --source=en --target=es --output_dir=data/wmt13_es_en \\
        --train=training/europarl-v7.es-en,commoncrawl.es-en,training/news-commentary-v8.es-en \\
        --validation=dev/newstest2013

or from a dataset on the Hugging Face hub that holds data files (the WMT script datasets only through their
Parquet conversion, `--revision=refs/convert/parquet`):

    python tools/prepare_wmt.py hub --dataset=wmt/wmt14 --config=de-en --source=en --target=de \\
        --output_dir=data/wmt14_en_de --splits=train:train,validation:validation

Writes `train.jsonl` and `validation.jsonl` (whole or not at all) and prints the pair counts; the recipes read
them with `data: {dataset: json, data_files: {train: .../train.jsonl, validation: .../validation.jsonl}}`.
Pairs with an empty side are left out; files whose line counts differ are refused.
"""

from __future__ import annotations

import html
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import fire
from tqdm.auto import tqdm

SEGMENT = re.compile(r"<seg[^>]*>(.*?)</seg>", re.IGNORECASE)


def _lines(path: Path) -> list[str]:
    """A side of a corpus: plain text, one sentence per line, or SGML `<seg>` elements (HTML escapes undone)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".sgm":
        return [html.unescape(segment).strip() for segment in SEGMENT.findall(text)]
    return [line.strip() for line in text.splitlines()]


def _side(raw_dir: Path, name: str, language: str) -> Path:
    """The file of one side: NAME.LANG, or the SGML forms of test sets (NAME-src.LANG.sgm, NAME-ref.LANG.sgm)."""
    candidates = [raw_dir / f"{name}.{language}", raw_dir / f"{name}-src.{language}.sgm"]
    candidates += [raw_dir / f"{name}-ref.{language}.sgm", raw_dir / f"{name}.{language}.sgm"]
    for path in candidates:
        if path.is_file():
            return path
    raise SystemExit(
        f"error: no {language} side of {name} in {raw_dir} (looked for {', '.join(p.name for p in candidates)})"
    )


def corpus_pairs(raw_dir: Path, name: str, source: str, target: str) -> Iterator[tuple[str, str]]:
    source_path, target_path = _side(raw_dir, name, source), _side(raw_dir, name, target)
    source_lines, target_lines = _lines(source_path), _lines(target_path)
    if len(source_lines) != len(target_lines):
        raise SystemExit(
            f"error: {source_path} has {len(source_lines):,} sentences and {target_path} {len(target_lines):,}; "
            "the sides of a corpus must be line-aligned"
        )
    yield from zip(source_lines, target_lines)


def write_pairs(pairs, path: Path, source: str, target: str, description: str) -> int:
    """Writes non-empty pairs as JSON lines through a temporary file; returns how many it wrote."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    written = 0
    try:
        with open(partial, "w", encoding="utf-8") as out:
            for source_text, target_text in tqdm(pairs, desc=description, unit=" pairs"):
                if source_text and target_text:
                    row = {"translation": {source: source_text, target: target_text}}
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
                    written += 1
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)
    return written


def _names(value) -> list[str]:
    """fire reads `a,b` as a tuple and `a` as a string."""
    return list(value) if isinstance(value, (tuple, list)) else [v for v in str(value).split(",") if v]


def text(raw_dir: str, source: str, target: str, output_dir: str, train, validation) -> None:
    """Line-aligned WMT text files (corpora named without the language suffix) -> train/validation JSON lines.

    Args:
        raw_dir: where the unpacked WMT files are.
        source: source language code, e.g. en.
        target: target language code, e.g. es.
        output_dir: where train.jsonl and validation.jsonl go.
        train: corpora for training, comma-separated, relative to raw_dir (e.g. training/europarl-v7.es-en).
        validation: corpora for evaluation, e.g. dev/newstest2013.
    """
    root, out = Path(raw_dir), Path(output_dir)
    counts = {}
    for split, names in (("train", _names(train)), ("validation", _names(validation))):
        pairs = (pair for name in names for pair in corpus_pairs(root, name, source, target))
        counts[split] = write_pairs(pairs, out / f"{split}.jsonl", source, target, split)
    print(f"wrote {counts['train']:,} training and {counts['validation']:,} validation pairs to {out}")


def hub(
    dataset: str,
    source: str,
    target: str,
    output_dir: str,
    config: str | None = None,
    revision: str | None = None,
    splits="train:train,validation:validation",
) -> None:
    """A hub dataset in the WMT `translation` layout -> JSON lines, split by split.

    Args:
        dataset: hub name, e.g. wmt/wmt14.
        source: source language code.
        target: target language code.
        output_dir: where the JSON lines go.
        config: the dataset's configuration, e.g. de-en.
        revision: a branch, tag or commit (refs/convert/parquet for a script dataset's Parquet files).
        splits: `their_split:our_name` pairs, comma-separated.
    """
    import datasets

    out, counts = Path(output_dir), {}
    for mapping in _names(splits):
        theirs, ours = mapping.split(":")
        rows = datasets.load_dataset(dataset, config, split=theirs, revision=revision)
        pairs = ((row["translation"][source].strip(), row["translation"][target].strip()) for row in rows)
        counts[ours] = write_pairs(pairs, out / f"{ours}.jsonl", source, target, ours)
    print(f"wrote {', '.join(f'{split}: {count:,} pairs' for split, count in counts.items())} to {out}")


if __name__ == "__main__":
    fire.Fire({"text": text, "hub": hub})
