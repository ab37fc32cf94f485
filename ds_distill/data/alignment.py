"""Two tokenizations of one text, aligned by the text they cover: the groups of consecutive tokens, one group on
each side, that end at the same byte of the text. A cross-tokenizer KD term compares each group's probability on
both sides (objectives/cross_tokenizer.py); a batch's groups are found where it is collated (`AlignedCollator`).

    encoded = tokenizer(text, return_offsets_mapping=True)
    ends = token_ends(encoded["offset_mapping"], text, [token_bytes(tokenizer)[i] for i in encoded["input_ids"]])
    groups = align(student_ends, teacher_ends)   # [(student indices, teacher indices), ...]

Only where a token ends counts, never where it starts, so the tokenizers may disagree on whether a token holds
the space before it (`Ġworld`, `▁world`) or how offsets are trimmed. Positions are bytes of the text as given,
before either tokenizer normalises it, so normalisation differences do not shift them; a character that a
byte-level vocabulary splits into its bytes ends each of them at its own byte, so the same tokenizer on both sides
gives one group per token. A token without text (BOS, EOS, a language code: offset (0, 0)) ends where the token
before it ends: it joins the group after it, or pairs with the other side's where both have one there (EOS with
EOS). A group closes wherever both sides end at the same byte, as TRL's GOLD closes them
(`ULDLoss._align_by_byte_offsets`, on byte offsets GOLD computes for byte-level tokenizers only; these come from
any fast tokenizer's character offsets); tokens after the last such place (one side truncated further than the
other) are in no group, where GOLD makes them one more group whose sides cover different text.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ds_distill.data import IGNORE_INDEX

Groups = list[tuple[list[int], list[int]]]

TEACHER_VIEW = "teacher_"
"""Across tokenizers (`losses.kd.cross_tokenizer`), the training rows also hold the teacher's tokens, in columns
with this prefix, and each side's `label_ends`: where each target token's text ends (`token_ends`)."""


def token_ends(offsets: Sequence[Sequence[int]], text: str, pieces: Sequence[bytes | None] | None = None) -> list[int]:
    """Where each token's text ends, as a UTF-8 byte index of `text`, from a fast tokenizer's character offsets
    and each token's bytes (`token_bytes`; None: unknown); non-decreasing. Tokens that share one character's span
    (its bytes, in a byte-level vocabulary) end within it by their byte lengths where those add up to the
    character's; otherwise only the last of them ends there. A token without text ends where the one before it
    ends; one whose span runs into the next token's (SentencePiece's lone `▁` is given the span of the character
    after it) ends where the next one starts."""
    byte_at = [0]
    for char in text:
        byte_at.append(byte_at[-1] + len(char.encode()))
    ends: list[int] = []
    i = 0
    while i < len(offsets):
        start, end = offsets[i]
        previous = ends[-1] if ends else 0
        if end <= start:
            ends.append(previous)
            i += 1
            continue
        last = i
        while last + 1 < len(offsets) and tuple(offsets[last + 1]) == (start, end):
            last += 1
        lengths = [len(pieces[k]) if pieces and pieces[k] is not None else None for k in range(i, last + 1)]
        if last > i and None not in lengths and sum(lengths) == byte_at[end] - byte_at[start]:
            position = byte_at[start]
            for length in lengths:
                position += length
                ends.append(max(position, previous))
        else:
            ends.extend([previous] * (last - i))
            after = offsets[last + 1] if last + 1 < len(offsets) else None
            overlapped = after is not None and after[1] > after[0] and after[0] < end
            ends.append(max(byte_at[after[0]] if overlapped else byte_at[end], previous))
        i = last + 1
    return ends


def token_bytes(tokenizer) -> list[bytes | None]:
    """Each id's text as it stands in running text, as UTF-8 bytes (a leading space where the token starts a word;
    a byte-level or byte-fallback token's byte, which may be part of a character); special tokens as spelt."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    backend = getattr(tokenizer, "backend_tokenizer", None)  # None: a slow (Python) tokenizer
    byte_level = backend is not None and (
        "ByteLevel" in repr(backend.decoder) or "ByteLevel" in repr(backend.pre_tokenizer)
    )
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    special = set(tokenizer.all_special_ids)
    texts: list[bytes | None] = [None] * len(tokenizer)
    for piece, index in tokenizer.get_vocab().items():
        if index >= len(texts):
            continue
        if byte_level and index not in special and all(c in byte_of for c in piece):
            texts[index] = bytes(byte_of[c] for c in piece)
        elif piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6 and index not in special:
            texts[index] = bytes([int(piece[3:5], 16)])  # SentencePiece's byte fallback
        else:
            texts[index] = piece.encode() if index in special else piece.replace("▁", " ").encode()
    return texts


def align(student_ends: Sequence[int], teacher_ends: Sequence[int]) -> Groups:
    """The groups (student token indices, teacher token indices) of two tokenizations' `token_ends`: each group
    ends where both sides end at the same byte, and holds every token since the group before."""
    groups: Groups = []
    s = t = s_start = t_start = 0
    while s < len(student_ends) and t < len(teacher_ends):
        if student_ends[s] < teacher_ends[t]:
            s += 1
        elif student_ends[s] > teacher_ends[t]:
            t += 1
        else:
            s, t = s + 1, t + 1
            groups.append((list(range(s_start, s)), list(range(t_start, t))))
            s_start, t_start = s, t
    return groups


def teacher_row(row: dict) -> dict:
    """A training row across tokenizers as the teacher reads it: its own tokens (the `TEACHER_VIEW` columns)."""
    return {
        k.removeprefix(TEACHER_VIEW): v
        for k, v in row.items()
        if k.startswith(TEACHER_VIEW) and k != TEACHER_VIEW + "label_ends"
    }


class AlignedCollator:
    """Collates training rows that hold both tokenizations (`TEACHER_VIEW` columns and each side's
    `label_ends`): the student's batch as `student` collates it, the teacher's under `teacher.` keys as
    `teacher` collates it, and the groups, laid out as each model's logits are (`shift` 1 for a causal LM,
    whose logits at t predict the label at t + 1; a group that holds a label no logit predicts is left out):

        align_group           [batch, student rows]  each target row's group (numbered across the batch), -1: none
        align_teacher_row     [batch, student rows]  at a group's last row, the flat index of the teacher's last
                                                     row of the group in its [batch x rows] logits; -1 elsewhere
        teacher.align_group   [batch, teacher rows]  the teacher's rows' groups
    """

    def __init__(self, student, teacher, shifts: tuple[int, int]):
        self.student, self.teacher, self.shifts = student, teacher, shifts

    def __call__(self, rows: list[dict]) -> dict:
        views: tuple[list[dict], list[dict]] = ([], [])
        ends: tuple[list[list[int]], list[list[int]]] = ([], [])
        for row in rows:
            student = {k: v for k, v in row.items() if not k.startswith(TEACHER_VIEW)}
            ends[0].append(student.pop("label_ends"))
            ends[1].append(row[TEACHER_VIEW + "label_ends"])
            views[0].append(student)
            views[1].append(teacher_row(row))
        batch = self.student(views[0])
        teacher = self.teacher(views[1])
        batch.update({f"teacher.{key}": value for key, value in teacher.items()})
        batch.update(self.groups(batch["labels"], teacher["labels"], ends))
        return batch

    def groups(self, labels: torch.Tensor, teacher_labels: torch.Tensor, ends: tuple[list, list]) -> dict:
        (s_shift, t_shift), batch = self.shifts, labels.shape[0]
        s_rows, t_rows = labels.shape[1] - s_shift, teacher_labels.shape[1] - t_shift
        group = torch.full((batch, s_rows), -1)
        last_teacher_row = torch.full((batch, s_rows), -1)
        teacher_group = torch.full((batch, t_rows), -1)
        number = 0
        for b in range(batch):
            s_targets = (labels[b] != IGNORE_INDEX).nonzero().squeeze(1).tolist()
            t_targets = (teacher_labels[b] != IGNORE_INDEX).nonzero().squeeze(1).tolist()
            for s_group, t_group in align(ends[0][b][: len(s_targets)], ends[1][b][: len(t_targets)]):
                s_pos = [s_targets[i] - s_shift for i in s_group]
                t_pos = [t_targets[i] - t_shift for i in t_group]
                if min(s_pos) < 0 or min(t_pos) < 0:
                    continue
                group[b, s_pos], teacher_group[b, t_pos] = number, number
                last_teacher_row[b, s_pos[-1]] = b * t_rows + t_pos[-1]
                number += 1
        return {"align_group": group, "align_teacher_row": last_teacher_row, "teacher.align_group": teacher_group}
