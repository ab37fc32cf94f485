"""What KD across tokenizers costs per step against the same-tokenizer term (CPU): the KD term's forward and
backward on random logits, and the host's alignment of a batch.

    python bench/cross_tokenizer.py [--tokens=1024] [--vocab=32000] [--student_vocab=8000] [--repeats=5]

Terms, each forward + backward over one micro-batch of `tokens` target positions (4 rows), T = 2, float32:
- same: forward KL, one vocabulary of `vocab` (`losses.kd` as today);
- hybrid, one tokenizer: the cross-tokenizer path on the same logits (every group one token, every id matched;
  equal in value to `same`): the cost of the path itself;
- uld / hybrid, a student of `student_vocab` ids: groups of 1 to 3 tokens on each side (as two real tokenizers
  give: the student's 2.5x smaller vocabulary spends ~1.3 tokens per teacher token), a third of the student's ids
  matched.
Repeats alternate between the terms; times are mean +- sd. Alignment: `AlignedCollator.groups` on 8 rows of
the shared sample tokenized by a SentencePiece and a byte-level BPE tokenizer, per batch.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import fire
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ds_distill.config.losses import KDOptions  # noqa: E402
from ds_distill.objectives.cross_tokenizer import VocabularyMatch  # noqa: E402
from ds_distill.objectives.logits import LogitDistillationLoss  # noqa: E402


def groups_of(sizes: list[tuple[int, int]], rows: int, positions: int, side: int) -> torch.Tensor:
    """Each position's group, groups laid out row by row with their `side` sizes."""
    group = torch.full((rows, positions), -1)
    flat, number = group.view(-1), 0
    cursor = 0
    for size in sizes:
        flat[cursor : cursor + size[side]] = number
        cursor, number = cursor + size[side], number + 1
    return group


def features(tokens: int, student_vocab: int, vocab: int, sizes: list[tuple[int, int]], seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    rows = 4
    s_positions = -(-sum(s for s, _ in sizes) // rows)
    t_positions = -(-sum(t for _, t in sizes) // rows)
    student = {"logits": torch.randn(rows, s_positions, student_vocab, generator=generator).requires_grad_(True),
               "labels": torch.randint(0, student_vocab, (rows, s_positions), generator=generator)}  # fmt: skip
    teacher = {"logits": torch.randn(rows, t_positions, vocab, generator=generator),
               "labels": torch.randint(0, vocab, (rows, t_positions), generator=generator)}  # fmt: skip
    student["align_group"] = groups_of(sizes, rows, s_positions, 0)
    teacher["align_group"] = groups_of(sizes, rows, t_positions, 1)
    for side in (student, teacher):
        side["labels"][side["align_group"] < 0] = -100
    t_last = {int(g): i for i, g in enumerate(teacher["align_group"].flatten().tolist()) if g >= 0}
    row = torch.full_like(student["labels"], -1).view(-1)
    s_flat = student["align_group"].flatten().tolist()
    for i, g in enumerate(s_flat):
        if g >= 0 and (i + 1 == len(s_flat) or s_flat[i + 1] != g):
            row[i] = t_last[g]
    student["align_teacher_row"] = row.view_as(student["labels"])
    targets = (student["labels"].flatten() != -100).nonzero().squeeze(1)
    from ds_distill.objectives.cross_tokenizer import chunk_breaks

    student["chunk_breaks"] = chunk_breaks(student["align_group"].flatten()[targets])
    return student, teacher


def timed(loss, student, teacher) -> float:
    started = time.perf_counter()
    value = loss(student, teacher)
    torch.autograd.grad(value, student["logits"])
    return time.perf_counter() - started


def alignment_per_batch() -> float:
    import tempfile

    from ds_distill.config.run import DataConfig
    from ds_distill.data.alignment import AlignedCollator, token_bytes
    from ds_distill.data.tokenized import _seq2seq_features
    from tests import tiny_models

    lines = [json.loads(line)["translation"] for line in open(tiny_models.SHARED_DATA / "train.jsonl")][:2000]
    texts = [row["de"] for row in lines[:8]]
    work = Path(tempfile.mkdtemp())
    sp = tiny_models.train_tokenizer(work / "sp")
    bl = tiny_models.byte_level_tokenizer([row[lang] for row in lines for lang in ("en", "de")])
    data = DataConfig(max_target_length=128)
    views = [_seq2seq_features(data, tok, texts, texts, token_bytes(tok)) for tok in (sp, bl)]
    labels = [torch.nn.utils.rnn.pad_sequence([torch.tensor(r) for r in v["labels"]], batch_first=True,
                                              padding_value=-100) for v in views]  # fmt: skip
    collator = AlignedCollator(None, None, (0, 0))
    spent = []
    for _ in range(20):
        started = time.perf_counter()
        collator.groups(labels[0], labels[1], (views[0]["label_ends"], views[1]["label_ends"]))
        spent.append(time.perf_counter() - started)
    return statistics.mean(spent[2:])


def main(tokens: int = 1024, vocab: int = 32000, student_vocab: int = 8000, repeats: int = 5) -> None:
    torch.manual_seed(0)
    ids = torch.arange(vocab)
    one = VocabularyMatch(ids, ids, vocab, vocab)
    shared = torch.randperm(vocab)[: student_vocab // 3]
    two = VocabularyMatch(shared, torch.randperm(student_vocab)[: len(shared)], vocab, student_vocab)
    rng = torch.Generator().manual_seed(1)
    sizes = []  # (student tokens, teacher tokens) per group, until `tokens` student positions
    while sum(s for s, _ in sizes) < tokens:
        s, t = int(torch.randint(1, 4, (1,), generator=rng)), int(torch.randint(1, 3, (1,), generator=rng))
        sizes.append((s, t))
    singletons = [(1, 1)] * tokens
    cases = {
        "same (forward KL)": (LogitDistillationLoss(KDOptions(temperature=2.0)), features(tokens, vocab, vocab,
                                                                                      singletons), None),
        "hybrid, one tokenizer": (LogitDistillationLoss(KDOptions(temperature=2.0, cross_tokenizer="hybrid")),
                                  features(tokens, vocab, vocab, singletons), one),
        "uld, 8k student": (LogitDistillationLoss(KDOptions(temperature=2.0, cross_tokenizer="uld")),
                            features(tokens, student_vocab, vocab, sizes), two),
        "hybrid, 8k student": (LogitDistillationLoss(KDOptions(temperature=2.0, cross_tokenizer="hybrid")),
                               features(tokens, student_vocab, vocab, sizes), two),
    }  # fmt: skip
    for loss, _, match in cases.values():
        loss.vocabulary_match = match
    times = {name: [] for name in cases}
    for repeat in range(repeats + 1):
        for name, (loss, (student, teacher), _) in cases.items():
            seconds = timed(loss, student, teacher)
            if repeat:  # the first round warms up
                times[name].append(seconds)
    base = statistics.mean(times["same (forward KL)"])
    print(f"KD term, forward + backward, {tokens} target tokens, teacher vocabulary {vocab:,}, T = 2, float32, CPU:")
    for name, spent in times.items():
        print(f"  {name:<24} {statistics.mean(spent) * 1e3:7.1f} ms +- {statistics.stdev(spent) * 1e3:.1f}"
              f"   x{statistics.mean(spent) / base:.2f}")  # fmt: skip
    print(f"aligning a batch of 8 rows on the host (AlignedCollator.groups): {alignment_per_batch() * 1e3:.2f} ms")


if __name__ == "__main__":
    fire.Fire(main)
