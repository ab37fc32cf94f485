"""Tiny models of each family, built from configs (nothing downloads), and the real-text data they train on.

Used by the tests and the benchmarks; run it directly to build them into a folder:

    python tests/tiny_models.py /tmp/tiny
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from ds_distill.data.tokenizers import train_sentencepiece_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wmt_ende_10k"


def train_tokenizer(directory: Path, vocab_size: int = 1000):
    """A sentencepiece tokenizer trained on both sides of the shared WMT sample, with a mask token for BERT."""
    tokenizer = train_sentencepiece_tokenizer(SHARED_DATA / "train.jsonl", ("en", "de"), directory, vocab_size)
    tokenizer.add_special_tokens({"mask_token": "<mask>"})
    tokenizer.save_pretrained(directory)
    return tokenizer


def padded_vocab(tokenizer) -> int:
    return -(-len(tokenizer) // 64) * 64  # padded past the tokenizer, as T5 checkpoints are (32128 vs 32100)


def build(directory: Path, tokenizer) -> dict[str, Path]:
    """Saves tiny random-weight teachers: t5 (seq2seq), gpt2 (causal LM), bert (masked LM), bert_bare (no head)."""
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        BertModel,
        GPT2Config,
        GPT2LMHeadModel,
        T5Config,
    )

    from ds_distill.models import adapter_for

    vocab = padded_vocab(tokenizer)
    bert = BertConfig(
        vocab_size=vocab,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    specs = {
        # through the adapter: a separate LM head like Flan-T5's (a plain T5 constructor ties it in transformers 5)
        "t5": adapter_for(T5Config()).from_config(
            T5Config(
                vocab_size=vocab,
                d_model=64,
                d_ff=128,
                d_kv=16,
                num_heads=4,
                num_layers=2,
                num_decoder_layers=2,
                feed_forward_proj="gated-gelu",
                tie_word_embeddings=False,  # the T5 v1.1 / Flan-T5 layout (kept as scale_decoder_outputs=False)
                decoder_start_token_id=0,
                pad_token_id=0,
                eos_token_id=1,
            )
        ),
        "gpt2": GPT2LMHeadModel(
            GPT2Config(
                vocab_size=vocab,
                n_embd=64,
                n_layer=2,
                n_head=4,
                n_positions=128,
                bos_token_id=1,
                eos_token_id=1,
                pad_token_id=0,
            )
        ),
        "bert": BertForMaskedLM(bert),
        "bert_bare": BertModel(bert, add_pooling_layer=False),
    }
    paths = {}
    for name, model in specs.items():
        torch.manual_seed(0)
        model.init_weights()
        paths[name] = directory / name
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return paths


def byte_level_tokenizer(lines: list[str], vocab_size: int = 400, directory: Path | None = None):
    """A byte-level BPE tokenizer (GPT-2's kind: `Ġ`, a character's bytes as tokens) trained on `lines`, with T5's
    special ids (pad 0, EOS 1 appended to every sequence, unk 2): another family than `train_tokenizer`'s."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<pad>", "</s>", "<unk>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=special
    )
    tokenizer.train_from_iterator(lines, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    if directory is not None:
        fast.save_pretrained(directory)
    return fast


def byte_level_t5(directory: Path, vocab_size: int = 400) -> Path:
    """A tiny random T5 (the size of `build`'s) reading through `byte_level_tokenizer`, trained on both sides of
    the shared sample: a student of another tokenizer family than the tiny teachers'."""
    from transformers import T5Config

    from ds_distill.models import adapter_for

    tokenizer = _sample_byte_level_tokenizer(directory, vocab_size)
    config = T5Config(vocab_size=padded_vocab(tokenizer), d_model=32, d_ff=64, d_kv=16, num_heads=2, num_layers=1,
                      num_decoder_layers=1, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)  # fmt: skip
    torch.manual_seed(0)
    model = adapter_for(config).from_config(config)
    # a head of a trained model's scale: a random T5's saturates its softmax, and there terms on sorted
    # probabilities (ULD) have almost no gradient
    model.lm_head.weight.data.mul_(0.02)
    model.save_pretrained(directory)
    return directory


def byte_level_gpt2(directory: Path, vocab_size: int = 400) -> Path:
    """A tiny random GPT-2 (one block, half the width of `build`'s) reading through `byte_level_tokenizer`: a
    decoder student of another tokenizer family than the tiny teachers'."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = _sample_byte_level_tokenizer(directory, vocab_size)
    config = GPT2Config(vocab_size=padded_vocab(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=128,
                        bos_token_id=1, eos_token_id=1, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


def _sample_byte_level_tokenizer(directory: Path, vocab_size: int):
    rows = [json.loads(line)["translation"] for line in open(SHARED_DATA / "train.jsonl")][:2000]
    return byte_level_tokenizer([row[lang] for row in rows for lang in ("en", "de")], vocab_size, directory)


def write_text_files(directory: Path, max_lines: int = 2000) -> dict[str, str]:
    """The German side of the shared sample as `text` files for the causal and masked LM tasks."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, name in (("train", "train.jsonl"), ("validation", "valid.jsonl")):
        lines = [json.loads(line)["translation"]["de"] for line in open(SHARED_DATA / name)][:max_lines]
        files[split] = str(directory / f"{split}.txt")
        Path(files[split]).write_text("\n".join(lines) + "\n")
    return files


if __name__ == "__main__":
    root = Path(sys.argv[1])
    built = build(root, train_tokenizer(root / "tokenizer"))
    write_text_files(root / "text")
    print("\n".join(f"{name}: {path}" for name, path in built.items()))
