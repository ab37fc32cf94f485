"""Two tokenizations of one text, aligned by the text they cover: the groups of consecutive tokens, one group on
each side, that end at the same character. A cross-tokenizer KD term compares each group's probability on both
sides (objectives/cross_tokenizer.py); the batch's groups are found where it is collated.

    ends = token_ends(tokenizer(text, return_offsets_mapping=True)["offset_mapping"])
    groups = align(student_ends, teacher_ends)   # [(student indices, teacher indices), ...]

Only where a token ends counts, never where it starts, so the tokenizers may disagree on whether a token holds
the space before it (`Ġworld`, `▁world`) or how offsets are trimmed. Positions are the characters of the text
as given, before either tokenizer normalises it, so normalisation differences do not shift them. A token
without text (a special token: BOS, EOS, a language code; offset (0, 0)) ends where the token before it ends, so
it joins the group after it, or, last on both sides, pairs with the other side's. So does a token whose span
runs into the next one's: a character split over several tokens (byte-level BPE splits an emoji into bytes that
all carry the character's span) ends only at its last token, and SentencePiece's lone `▁` (given the span of the
character after it) ends nowhere. A group closes only where both sides end at the same character; tokens after the last such place (one
side truncated further than the other) are in no group, and no term compares them. This is the rule of TRL's
GOLD (`ULDLoss._align_by_byte_offsets`) on characters instead of bytes, except that it never emits a final group
whose two sides end at different places.
"""

from __future__ import annotations

from collections.abc import Sequence

Groups = list[tuple[list[int], list[int]]]


def token_ends(offsets: Sequence[Sequence[int]]) -> list[int]:
    """Where each token's text ends (a character index of the text), from a fast tokenizer's offset mapping,
    non-decreasing. A token without text, or one whose span runs into the next token's (bytes of one character;
    SentencePiece's lone `▁`, given the span of the character after it), ends where the token before it ends."""
    ends: list[int] = []
    for index, (start, end) in enumerate(offsets):
        previous = ends[-1] if ends else 0
        after = offsets[index + 1] if index + 1 < len(offsets) else None
        overlapped = after is not None and after[1] > after[0] and after[0] < end
        ends.append(previous if end <= start or overlapped else max(end, previous))
    return ends


def align(student_ends: Sequence[int], teacher_ends: Sequence[int]) -> Groups:
    """The groups (student token indices, teacher token indices) of two tokenizations' `token_ends`: each group
    ends where both sides end at the same character past the group before, and holds every token since it; the
    last tokens of both sides, without text (end-of-sequence tokens), pair as a group of their own."""
    groups: Groups = []
    s = t = s_start = t_start = covered = 0
    while s < len(student_ends) and t < len(teacher_ends):
        if student_ends[s] < teacher_ends[t]:
            s += 1
        elif student_ends[s] > teacher_ends[t]:
            t += 1
        else:
            s, t = s + 1, t + 1
            # a group covers text, but for the last tokens of both sides (their end-of-sequence tokens)
            if student_ends[s - 1] > covered or (s, t) == (len(student_ends), len(teacher_ends)):
                groups.append((list(range(s_start, s)), list(range(t_start, t))))
                s_start, t_start, covered = s, t, student_ends[s - 1]
    return groups
