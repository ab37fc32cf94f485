"""A student with a vocabulary of its own, cut from its teacher: each new token's embedding (and LM head row,
where the head is not tied to the embeddings) starts as the mean of the teacher's rows for the pieces the
teacher's tokenizer splits the token's text into, as mergekit's tokensurgeon and FOCUS/WECHSEL-style methods
start; a special token takes the row of the teacher's token of the same role (EOS, padding, ...).

    ds-distill make_student --teacher=T --output_dir=OUT --tokenizer=DIR [--d_model ...]
    ds-distill train_tokenizer --config=RUN.yaml --vocab_size=8000 --output_dir=DIR   # such a vocabulary

A token's text is split as it stands inside running text: after a probe character, whose pieces are then
dropped, so that a word-inner piece (`ing`) is not read as a word start (`▁ing`) by a SentencePiece teacher.
A token whose text the teacher cannot split into known pieces (a lone byte of a longer character, text the
teacher's vocabulary lacks) starts as the mean of all the teacher's rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ds_distill import models
from ds_distill.data.alignment import token_bytes

SPECIAL_ROLES = ("pad_token", "eos_token", "bos_token", "unk_token", "sep_token", "cls_token", "mask_token")
PROBE = "a"
"""The character a token's text is split after (its own pieces dropped)."""
PAD_TO = 64
"""Embedding rows are padded to a multiple of this (as T5's 32,100 tokens have 32,128 rows)."""


@dataclass
class Coverage:
    """How the new vocabulary's tokens map onto the teacher's pieces."""

    one: int = 0
    several: int = 0
    none: list[str] = field(default_factory=list)

    def summary(self) -> str:
        total = self.one + self.several + len(self.none)
        examples = ", ".join(repr(text) for text in self.none[:5])
        return (f"{total:,} tokens: {self.one:,} are one teacher piece, {self.several:,} several, {len(self.none):,} "
                f"none (the mean of all rows{': ' + examples if examples else ''})")  # fmt: skip


def teacher_pieces(tokenizer, teacher_tokenizer) -> tuple[list[list[int]], Coverage]:
    """For each id of `tokenizer`, the teacher's ids its text splits into (empty: none), and the coverage."""
    pieces, coverage = [], Coverage()
    roles = {getattr(tokenizer, f"{role}_id"): role for role in SPECIAL_ROLES if getattr(tokenizer, role) is not None}
    probe = teacher_tokenizer(PROBE, add_special_tokens=False)["input_ids"]
    for index, text in enumerate(token_bytes(tokenizer)):
        if index in roles:
            same = getattr(teacher_tokenizer, f"{roles[index]}_id")
            ids = [same] if same is not None else []
        elif index in tokenizer.all_special_ids or text is None:
            ids = []
        else:
            ids = _split(text, teacher_tokenizer, probe)
        pieces.append(ids)
        if len(ids) == 1:
            coverage.one += 1
        elif ids:
            coverage.several += 1
        else:
            coverage.none.append(tokenizer.convert_ids_to_tokens(index))
    return pieces, coverage


def _split(text: bytes, teacher_tokenizer, probe: list[int]) -> list[int]:
    try:
        string = text.decode("utf-8")
    except UnicodeDecodeError:  # a byte of a longer character: the teacher's byte token, where it has one
        byte = teacher_tokenizer.convert_tokens_to_ids(f"<0x{text[0]:02X}>") if len(text) == 1 else None
        return [byte] if byte is not None and byte != teacher_tokenizer.unk_token_id else []
    ids = teacher_tokenizer(PROBE + string, add_special_tokens=False)["input_ids"]
    ids = ids[len(probe) :] if ids[: len(probe)] == probe else teacher_tokenizer(string, add_special_tokens=False)[
        "input_ids"]  # fmt: skip
    return [] if not ids or teacher_tokenizer.unk_token_id in ids else ids


SPECIAL_IDS = ("pad_token_id", "eos_token_id", "bos_token_id", "decoder_start_token_id")


def vocabulary_config(config, teacher_tokenizer, tokenizer) -> None:
    """`config` (the teacher's architecture) with `tokenizer`'s vocabulary: its size padded to PAD_TO, and each
    special id the new one of the same role (the teacher's decoder start, its padding: the new padding), else of
    the same text; a list of ids (Llama 3's EOS and end-of-turn ids) mapped id by id, those the new vocabulary
    lacks left out."""
    config.vocab_size = -(-len(tokenizer) // PAD_TO) * PAD_TO
    for name in SPECIAL_IDS:
        old = getattr(config, name, None)
        if isinstance(old, (list, tuple)):
            new = dict.fromkeys(_same_special(o, teacher_tokenizer, tokenizer) for o in old)
            setattr(config, name, [i for i in new if i is not None] or None)
        else:
            setattr(config, name, None if old is None else _same_special(old, teacher_tokenizer, tokenizer))


def _same_special(old: int, teacher_tokenizer, tokenizer) -> int | None:
    role = next((r for r in SPECIAL_ROLES if getattr(teacher_tokenizer, f"{r}_id") == old), None)
    if role is not None and getattr(tokenizer, f"{role}_id") is not None:
        return getattr(tokenizer, f"{role}_id")
    return tokenizer.get_vocab().get(teacher_tokenizer.convert_ids_to_tokens(old))


def transplant(directory: Path, teacher_tokenizer, tokenizer) -> Coverage:
    """Gives the student saved in `directory` (cut from the teacher, with its vocabulary) `tokenizer`'s
    vocabulary, rows made from the teacher's (the student's own, cut to its width); rewrites the directory."""
    config = models.load_config(str(directory), "student")
    adapter = models.adapter_for(config)
    model = adapter.from_pretrained(str(directory), "student", dtype=torch.float32)
    pieces, coverage = teacher_pieces(tokenizer, teacher_tokenizer)
    embeddings = model.get_input_embeddings().weight.detach().clone()
    head = model.get_output_embeddings()
    tied = head is None or head.weight is model.get_input_embeddings().weight
    head_rows = None if tied else head.weight.detach().clone()
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=PAD_TO, mean_resizing=False)
    with torch.no_grad():
        for old, new in ((embeddings, model.get_input_embeddings().weight),
                         *(((head_rows, model.get_output_embeddings().weight),) if head_rows is not None else ())):  # fmt: skip
            known = old[: len(teacher_tokenizer)]
            new.copy_(known.mean(0).expand_as(new))
            for index, ids in enumerate(pieces):
                if ids:
                    new[index] = known[ids].mean(0)
    vocabulary_config(model.config, teacher_tokenizer, tokenizer)
    if model.generation_config is not None:
        for name in SPECIAL_IDS:
            setattr(model.generation_config, name, getattr(model.config, name, None))
    with models.quiet_saving():
        model.save_pretrained(directory)
    for stale in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model"):
        (directory / stale).unlink(missing_ok=True)
    tokenizer.save_pretrained(directory)
    return coverage
