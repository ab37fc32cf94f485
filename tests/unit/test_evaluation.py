"""Evaluation scores generations against the reference texts themselves, as sacrebleu defines BLEU."""

import json
from collections import Counter

import pytest
import sacrebleu
import torch

from ds_distill import models
from ds_distill.config.run import RunConfig
from ds_distill.config.typed import from_dict
from ds_distill.data import batches, tokenizers
from ds_distill.data import tokenized as data
from ds_distill.train.scoring import score
from tests.conftest import translation_config


def test_bleu_is_sacrebleu_against_the_raw_references_not_the_truncated_labels(tiny, tmp_path):
    run = from_dict(
        RunConfig,
        translation_config(tiny, tmp_path, data={"max_target_length": 8}, train={"eval_metric": "bleu"}),
    )
    tokenizer = tokenizers.load_tokenizer(str(tiny["tokenizer"]))
    validation = data.tokenize(run.data, tokenizer, data.load_raw(run.data))["validation"]
    model = models.adapter_for(models.load_config(str(tiny["t5"]), "t")).from_pretrained(str(tiny["t5"]))
    labels = {tuple(row["input_ids"]): row["labels"] for row in validation}

    def generate(input_ids, attention_mask, **kwargs):
        """'Hypotheses' that are the truncated labels: what was wrongly used as references before."""
        rows = [labels[tuple(ids[mask.bool()].tolist())] for ids, mask in zip(input_ids, attention_mask)]
        return torch.nn.utils.rnn.pad_sequence([torch.tensor(r) for r in rows], batch_first=True)

    model.generate = generate
    texts = {}
    collate = batches.make_collator(run.data, tokenizer, model)
    results = score(model, validation, collate, tokenizer, run, texts=texts)

    raw = [json.loads(line)["translation"]["de"] for line in open(run.data.data_files["validation"])]
    assert texts["references"] == raw
    hypotheses = tokenizer.batch_decode([row["labels"] for row in validation], skip_special_tokens=True)
    assert texts["hypotheses"] == hypotheses
    assert results["bleu"] == sacrebleu.corpus_bleu(hypotheses, [raw]).score
    assert 0 < results["bleu"] < 50  # 8-token prefixes of the references; against themselves they would score 100


def test_token_accuracy_is_the_share_of_target_tokens_predicted_by_argmax(tiny, tmp_path):
    run = from_dict(RunConfig, translation_config(tiny, tmp_path))
    tokenizer = tokenizers.load_tokenizer(str(tiny["tokenizer"]))
    validation = data.tokenize(run.data, tokenizer, data.load_raw(run.data))["validation"]
    model = models.adapter_for(models.load_config(str(tiny["t5"]), "t")).from_pretrained(str(tiny["t5"])).eval()
    # a random tiny model predicts almost no token right (none, with some thread counts); lifting the most common
    # target token's logit makes the accuracy a share strictly between 0 and 1 whatever the numerics
    common = Counter(token for row in validation["labels"] for token in row).most_common(1)[0][0]

    def lift(module, args, logits):
        logits = logits.clone()
        logits[..., common] += 100.0
        return logits

    model.lm_head.register_forward_hook(lift)
    collate = batches.make_collator(run.data, tokenizer, model)
    results = score(model, validation, collate, tokenizer, run)

    correct = total = 0
    with torch.no_grad():
        for batch, _, _ in batches.eval_batches(validation, collate, 7):  # one rank: every row real
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[..., : len(tokenizer)]
            real = batch["labels"] != -100
            correct += int((logits.argmax(-1) == batch["labels"])[real].sum())
            total += int(real.sum())
    assert results["accuracy"] == pytest.approx(correct / total) and 0 < results["accuracy"] < 1


def test_bits_per_byte_is_the_loss_in_bits_over_the_target_texts_bytes(tiny, tmp_path):
    """The eval loss (nats per target token) x tokens / ln 2 over the UTF-8 bytes the target tokens spell
    (special tokens none, `<unk>` among them; a word's `▁` its space): written out from the decoded targets."""
    import math

    run = from_dict(RunConfig, translation_config(tiny, tmp_path))
    tokenizer = tokenizers.load_tokenizer(str(tiny["tokenizer"]))
    validation = data.tokenize(run.data, tokenizer, data.load_raw(run.data))["validation"]
    model = models.adapter_for(models.load_config(str(tiny["t5"]), "t")).from_pretrained(str(tiny["t5"])).eval()
    results = score(model, validation, batches.make_collator(run.data, tokenizer, model), tokenizer, run)

    pieces = [tokenizer.convert_ids_to_tokens(row) for row in validation["labels"]]
    tokens = sum(len(row) for row in pieces)
    special = set(tokenizer.all_special_tokens)  # EOS, and `<unk>`, whose text is not known from its id
    text_bytes = sum(len(p.replace("▁", " ").encode()) for row in pieces for p in row if p not in special)
    assert results["bits_per_byte"] == pytest.approx(results["loss"] * tokens / math.log(2) / text_bytes, rel=1e-9)
