"""Text packed into blocks of tokens: causal LM blocks (run_clm.py's `group_texts`), masked LM blocks framed by the
tokenizer's special tokens, and, across tokenizers, causal LM blocks cut by the student's tokens with the teacher's
tokens of the same text beside them (`pack_aligned`).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

from ds_distill.config.run import DataConfig
from ds_distill.data.alignment import TEACHER_VIEW, token_bytes, token_ends
from ds_distill.errors import ConfigError


def pack(documents: list[list[int]], block_tokens: int, separator: list[int], frame=([], [])) -> list[list[int]]:
    """Documents (token ids) joined, each followed by `separator`, and cut into blocks of `block_tokens`, the
    remainder dropped (Hugging Face's `group_texts` in run_clm.py and run_mlm.py); each block is then framed:
    `frame[0] + block + frame[1]`. A document longer than a block goes on into the next ones."""
    ids = [token for document in documents for token in document + separator]
    usable = len(ids) // block_tokens * block_tokens
    before, after = frame
    return [before + ids[i : i + block_tokens] + after for i in range(0, usable, block_tokens)]


def causal_lm_rows(data: DataConfig, tokenizer):
    """Batched map function of packed `causal_lm`: documents each ended by EOS, as run_clm.py packs them, in
    blocks of block_size. Labels are the inputs (the model's logits are shifted against them later); blocks hold
    no padding, so EOS stays a target even where a tokenizer pads with EOS."""

    def rows(batch):
        blocks = pack(tokenizer(batch[data.text_field])["input_ids"], data.block_size, [tokenizer.eos_token_id])
        return {"input_ids": blocks, "attention_mask": [[1] * len(b) for b in blocks], "labels": [b[:] for b in blocks]}

    return rows


Side = tuple[list[list[int]], list[list[int]], int]  # one tokenizer's documents: ids, token_ends, its EOS id


def pack_aligned(
    sizes: Sequence[int], student: Side, teacher: Side, block_tokens: int
) -> tuple[list, list, list, list]:
    """Packed causal LM text across tokenizers: (student blocks, their token ends, teacher rows, their token ends).

    Each side's documents (`sizes`: their lengths in bytes) are joined, each followed by that side's EOS, which is
    given a byte of its own so that every document ends at a byte both sides end at. The student's stream is cut
    into blocks of `block_tokens` as `pack` cuts it; beside each block, the teacher's row holds the teacher's tokens
    that end inside the block's text. The two may start at different bytes (a teacher token can run on from the
    block before): the first group, which holds each side's first token, is one no logit predicts, and the
    collator leaves it out, so every group it keeps covers the same text on both sides. Ends are counted from the
    block's first byte."""
    streams = []
    for ids, ends, eos in (student, teacher):
        stream_ids, stream_ends, offset = [], [], 0
        for size, document, document_ends in zip(sizes, ids, ends):
            stream_ids += [*document, eos]
            stream_ends += [offset + end for end in document_ends] + [offset + size + 1]
            offset += size + 1
        streams.append((stream_ids, stream_ends))
    (s_ids, s_ends), (t_ids, t_ends) = streams
    blocks: tuple[list, list, list, list] = ([], [], [], [])
    for start in range(0, len(s_ids) // block_tokens * block_tokens, block_tokens):
        base = s_ends[start - 1] if start else 0
        last = s_ends[start + block_tokens - 1]
        first, after = bisect_right(t_ends, base), bisect_right(t_ends, last)
        blocks[0].append(s_ids[start : start + block_tokens])
        blocks[1].append([end - base for end in s_ends[start : start + block_tokens]])
        blocks[2].append(t_ids[first:after])
        blocks[3].append([end - base for end in t_ends[first:after]])
    return blocks


def aligned_causal_lm_rows(data: DataConfig, tokenizer, teacher_tokenizer):
    """Batched map function of packed `causal_lm` across tokenizers: the student's blocks (`causal_lm_rows`'
    blocks) with the teacher's tokens of the same text in `TEACHER_VIEW` columns, and each side's `label_ends`."""
    pieces = token_bytes(tokenizer), token_bytes(teacher_tokenizer)

    def side(texts, side_tokenizer, side_pieces) -> Side:
        encoded = side_tokenizer(texts, return_offsets_mapping=True)
        ends = [token_ends(offsets, text, [side_pieces[i] for i in ids])
                for offsets, text, ids in zip(encoded["offset_mapping"], texts, encoded["input_ids"])]  # fmt: skip
        return encoded["input_ids"], ends, side_tokenizer.eos_token_id

    def rows(batch):
        texts = batch[data.text_field]
        sizes = [len(text.encode()) for text in texts]
        s_ids, s_ends, t_ids, t_ends = pack_aligned(
            sizes, side(texts, tokenizer, pieces[0]), side(texts, teacher_tokenizer, pieces[1]), data.block_size
        )
        return {
            "input_ids": s_ids, "attention_mask": [[1] * len(b) for b in s_ids], "labels": [b[:] for b in s_ids],
            "label_ends": s_ends, TEACHER_VIEW + "input_ids": t_ids,
            TEACHER_VIEW + "attention_mask": [[1] * len(b) for b in t_ids], TEACHER_VIEW + "labels": [b[:] for b in t_ids],
            TEACHER_VIEW + "label_ends": t_ends,
        }  # fmt: skip

    return rows


def special_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after one sequence: ([CLS], [SEP]) for BERT,
    ([<s>], [</s>]) for RoBERTa, ([], [</s>]) for T5. Read off an encoding, which every tokenizer can do."""
    text = "a b"
    inner, whole = tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer(text)["input_ids"]
    for start in range(len(whole) - len(inner) + 1):
        if whole[start : start + len(inner)] == inner:
            return whole[:start], whole[start + len(inner) :]
    raise ConfigError(f"cannot tell where {type(tokenizer).__name__} puts its special tokens; set data.line_by_line")


def masked_lm_rows(data: DataConfig, tokenizer):
    """Batched map function of `masked_lm`: one row per line cut at max_source_length (`data.line_by_line`), or
    the lines packed into full blocks of max_source_length tokens, each framed by the tokenizer's special tokens.

    Packing is run_mlm.py's `group_texts`, except that run_mlm frames each line and concatenates, so its blocks
    start and end mid-text. BERT-style models were pretrained on `[CLS] text [SEP]` (RoBERTa: `<s> text </s>`)
    with [SEP] between segments: here each block is `[CLS] ... [SEP]` and lines are separated by [SEP], so the
    teacher reads inputs like its pretraining data and its [CLS] position means what it always meant.
    """
    if data.line_by_line:
        return lambda batch: tokenizer(
            batch[data.text_field],
            max_length=data.max_source_length,
            truncation=True,
            return_special_tokens_mask=True,
        )
    frame = special_frame(tokenizer)
    block = data.max_source_length - len(frame[0]) - len(frame[1])
    if block < 1:
        raise ConfigError(f"data.max_source_length {data.max_source_length} leaves no room between special tokens")
    separator = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    separator = [] if separator is None else [separator]

    def rows(batch):
        documents = tokenizer(batch[data.text_field], add_special_tokens=False)["input_ids"]
        blocks = pack(documents, block, separator, frame)
        columns = {
            "input_ids": blocks,
            "attention_mask": [[1] * len(ids) for ids in blocks],
            # never masked: the frame, the separators (and [UNK]), as the collator itself would decide
            "special_tokens_mask": [
                tokenizer.get_special_tokens_mask(ids, already_has_special_tokens=True) for ids in blocks
            ],
        }
        if "token_type_ids" in tokenizer.model_input_names:
            columns["token_type_ids"] = [[0] * len(ids) for ids in blocks]
        return columns

    return rows
