"""KD between a teacher and a student whose tokenizers differ (`losses.kd.cross_tokenizer: uld | hybrid`).

The target text is tokenized by both tokenizers, and the two token sequences are cut into groups that cover the
same text (`data/alignment.py`). For a group of tokens y_1..y_m on one side, the merged distribution is the
probability of the group's text so far and each possible last token,

    q(v) = p(y_1) p(y_2 | y_1) ... p(y_{m-1} | y_<m-1) * p(v | y_<m)        (all at the KD temperature)

(GOLD's "bayesian" merge: TRL's `uld_token_merge_strategy="bayesian"`): every target token of
the group is in it, and a one-token group is that token's distribution. Per group the two sides' merged rows are
compared by

- `uld`: Universal Logit Distillation (Boizard et al. 2024): the L1 distance between the two rows' probabilities
  sorted in descending order (the shorter vocabulary padded with zeros), which needs no shared vocabulary;
- `hybrid` (GOLD): tokens whose text is in both vocabularies (`VocabularyMatch`) by the run's divergence
  (`losses.kd.divergence`) between the two rows at those tokens, the other tokens by the sorted L1 of what is left
  of each row; weighted by the matched share of the teacher's vocabulary and the rest (or by
  `losses.kd.hybrid_matched_weight` and the rest). With one tokenizer every token matches and every group is one
  token, so `hybrid` is the same-tokenizer KD term.

Where this differs from TRL's GOLD (trl/experimental/gold/gold_trainer.py, `ULDLoss`): a term is a mean over the
step's target tokens, as every term here, not a mean over each sequence's groups and then over sequences (a
long target weighs as much as its tokens); the KL family is scaled by T^2 and the L1 by T as in the same-tokenizer
term (`divergences.temperature_scale`; GOLD scales neither); the matched share is counted over the teacher's tokenizer
vocabulary, not its logit width (which may hold padding rows, and then one tokenizer would not reduce to the
same-tokenizer term); probabilities are compared in log space without GOLD's 1e-8 floor (merged rows of long
groups fall below it); vocabulary entries match by the text they stand for (`▁x`, `Ġx` and ` x` alike), not by
their spelling. As in GOLD, where one side has no unmatched token the unmatched term is 0 (the other side's
unmatched mass is a constant the student cannot change). On two byte-level tokenizers the groups and both terms
equal GOLD's with its floor lifted (tests/unit/test_cross_tokenizer.py).

The term runs inside the one chunked pass over the student's target rows (`logits.TargetRows`), whose chunks end
only between groups (`chunk_breaks`), so a group's rows and their gradients are made together; the teacher's rows
are gathered per chunk. No [tokens, vocabulary] float32 tensor of either side is made.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ds_distill.data.alignment import token_bytes
from ds_distill.objectives.divergences import divergence, temperature_scale


@dataclass
class VocabularyMatch:
    """The tokens both vocabularies hold with the same text: teacher ids and the student ids they match."""

    teacher_ids: torch.Tensor
    student_ids: torch.Tensor
    teacher_vocab: int
    """The teacher's tokenizer vocabulary (the matched share is counted over it)."""
    student_vocab: int

    @classmethod
    def of(cls, student_tokenizer, teacher_tokenizer) -> VocabularyMatch:
        student = {key: i for i, key in reversed(list(enumerate(_match_keys(student_tokenizer)))) if key}
        pairs = [(t, student[key]) for t, key in enumerate(_match_keys(teacher_tokenizer)) if key in student]
        taken: set[int] = set()
        unique = [(t, s) for t, s in pairs if not (s in taken or taken.add(s))]  # one teacher token per student one
        teacher_ids, student_ids = zip(*unique) if unique else ((), ())
        return cls(torch.tensor(teacher_ids, dtype=torch.long), torch.tensor(student_ids, dtype=torch.long),
                   len(teacher_tokenizer), len(student_tokenizer))  # fmt: skip

    def __post_init__(self):
        whole = torch.arange(self.teacher_vocab)
        self.identity = self.teacher_vocab == self.student_vocab and all(
            torch.equal(ids, whole) for ids in (self.teacher_ids, self.student_ids)
        )
        """One vocabulary on both sides: every id matches itself, and no row needs indexing."""

    @property
    def matched_share(self) -> float:
        return len(self.teacher_ids) / self.teacher_vocab


def _match_keys(tokenizer) -> list[tuple[bytes, bool] | None]:
    """What a token matches by: its text's bytes, and whether it stands for a lone byte (SentencePiece's byte
    fallback `<0x41>`, or a byte-level token that is not a whole character). A byte token matches a byte token,
    so `<0x41>` and `A` in one vocabulary stay apart and one tokenizer matches itself id for id."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    keys: list[tuple[bytes, bool] | None] = []
    for piece, text in zip(pieces, token_bytes(tokenizer)):
        if text is None:
            keys.append(None)
            continue
        fallback = isinstance(piece, str) and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")
        try:
            text.decode("utf-8")
            whole = True
        except UnicodeDecodeError:
            whole = False
        keys.append((text, fallback or not whole))
    return keys


def chunk_breaks(groups: torch.Tensor) -> list[int]:
    """Where a chunk of target rows may end: after every row but the ones followed by a row of their group
    (`groups`: each target row's group, in the rows' order; -1 for rows in none)."""
    groups = groups.tolist()
    return [r + 1 for r in range(len(groups)) if r + 1 == len(groups) or groups[r] < 0 or groups[r + 1] != groups[r]]


def sorted_l1(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per row, the L1 distance between the probabilities sorted in descending order, the narrower row padded with
    zeros: `[G, V1], [G, V2] -> [G]`."""
    width = max(p.shape[-1], q.shape[-1])
    p, q = (F.pad(x.sort(dim=-1, descending=True).values, (0, width - x.shape[-1])) for x in (p, q))
    return (p - q).abs().sum(-1)


def merged_rows(log_probs: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, last: torch.Tensor):
    """The merged log-distribution of each group whose last row is here: `log_probs` [R, V] of consecutive
    rows, their `labels` [R], `groups` [R] (-1: in none) and `last` [R] (a group's last row). The rows before a
    group's last row add their label's log-probability. `[G, V]`, in the order of the last rows."""
    last_groups = groups[last]
    earlier = (groups >= 0) & ~last
    chosen = log_probs[earlier].gather(1, labels[earlier].unsqueeze(1)).squeeze(1)
    prefix = torch.zeros(len(last_groups), dtype=log_probs.dtype, device=log_probs.device)
    prefix = prefix.index_add(0, torch.searchsorted(last_groups, groups[earlier]), chosen)
    return log_probs[last] + prefix.unsqueeze(1)


def group_divergence(
    kind: str, log_teacher: torch.Tensor, log_student: torch.Tensor, match: VocabularyMatch, kd, scales: Sequence
) -> torch.Tensor:
    """Per group, `uld` or `hybrid` between the teacher's and the student's merged rows (`kd`: the KD options;
    `scales`: the KL family's and the L1's temperature factors)."""
    kl_scale, l1_scale = scales
    if kind == "uld":
        return l1_scale * sorted_l1(log_teacher.exp(), log_student.exp())
    if match.identity:
        return kl_scale * divergence(kd.divergence, log_teacher, log_student, kd.beta, kd.alpha)
    t_ids, s_ids = match.teacher_ids.to(log_teacher.device), match.student_ids.to(log_student.device)
    matched = divergence(kd.divergence, log_teacher[:, t_ids], log_student[:, s_ids], kd.beta, kd.alpha)
    weight = match.matched_share if kd.hybrid_matched_weight is None else kd.hybrid_matched_weight
    if len(t_ids) == match.teacher_vocab or len(s_ids) == match.student_vocab:
        # no unmatched token on a side: the other side's unmatched mass is a constant the student cannot change,
        # and the term is 0 (as GOLD's)
        return weight * kl_scale * matched
    rest = [torch.ones(x.shape[-1], dtype=torch.bool, device=x.device).index_fill(0, ids, False)
            for x, ids in ((log_teacher, t_ids), (log_student, s_ids))]  # fmt: skip
    unmatched = sorted_l1(log_teacher[:, rest[0]].exp(), log_student[:, rest[1]].exp())
    return weight * kl_scale * matched + (1 - weight) * l1_scale * unmatched


def row_term(kd, match: VocabularyMatch, student: dict, teacher: dict):
    """The KD term's (fn, other tensors, scale) for `logits.logit_terms` across tokenizers. Besides the logits and
    labels, `student` holds `align_group` (each position's group, -1 for none) and `align_teacher_row` (at a
    group's last position, the flat index of the teacher's last row of the group; -1 elsewhere); `teacher` holds
    its `logits`, `labels` and `align_group` in its own positions."""
    kind, temperature = kd.cross_tokenizer, kd.temperature
    scales = (temperature_scale(kd.divergence, temperature), temperature_scale("tvd", temperature))
    teacher_logits = teacher["logits"]  # indexed by (row, position): a causal teacher's are a view, not flattened
    positions = teacher_logits.shape[1]
    prefix = teacher_prefix(teacher, student["align_teacher_row"], temperature, match.teacher_vocab)

    def fn(logits, labels, groups, teacher_rows, teacher_prefixes):
        last = teacher_rows >= 0  # (no `.any()`: a chunk without a group's end sums to 0 without a device sync)
        log_student = merged_rows(F.log_softmax(logits[:, : match.student_vocab] / temperature, -1), labels,
                                  groups, last)  # fmt: skip
        flat = teacher_rows[last]
        rows = teacher_logits[
            flat.div(positions, rounding_mode="floor"), flat.remainder(positions), : match.teacher_vocab
        ]
        log_teacher = F.log_softmax(rows.to(logits.dtype) / temperature, -1) + teacher_prefixes[last].unsqueeze(1)
        return group_divergence(kind, log_teacher, log_student, match, kd, scales).sum()

    others = (student["labels"], student["align_group"], student["align_teacher_row"], prefix)
    return fn, others, 1.0


@torch.no_grad()
def teacher_prefix(teacher: dict, student_rows: torch.Tensor, temperature: float, vocab: int) -> torch.Tensor:
    """At each student position that ends a group (`student_rows` >= 0), the log-probability the teacher gives
    its own tokens before its last one in that group; in chunks of rows, so no [tokens, vocabulary] float32
    copy."""
    groups, labels = teacher["align_group"].flatten(), teacher["labels"].flatten()
    logits = teacher["logits"]  # [rows, positions, vocabulary], indexed by both (no flattened copy)
    positions = logits.shape[1]
    wide = torch.promote_types(logits.dtype, torch.float32)
    rows = (groups >= 0).nonzero().squeeze(1)
    last = torch.ones_like(rows, dtype=torch.bool)
    last[:-1] = groups[rows[1:]] != groups[rows[:-1]]
    earlier = rows[~last]
    per_group = torch.zeros(int(groups.max().item()) + 1 if len(rows) else 0, dtype=wide, device=logits.device)
    for chunk in earlier.split(max(1, 2**22 // logits.shape[-1])):
        chunk_logits = logits[chunk.div(positions, rounding_mode="floor"), chunk.remainder(positions), :vocab]
        chosen = F.log_softmax(chunk_logits.to(wide) / temperature, -1).gather(1, labels[chunk].unsqueeze(1))
        per_group.index_add_(0, groups[chunk], chosen.squeeze(1))
    prefix = torch.zeros(student_rows.shape, dtype=wide, device=logits.device)
    ends = student_rows >= 0
    prefix[ends] = per_group[groups[student_rows[ends]]]
    return prefix
