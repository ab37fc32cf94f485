"""Validation: the student's token-level loss on held-out data, and BLEU (sacrebleu) or ROUGE on generations.

Runs on every rank over that rank's share of the set (equal batch counts, which ZeRO-3 needs) and reduces
the sums; under ZeRO-3 `generate` must be told to keep ranks in step (`synced_gpus`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ds_distill import data, dist, models
from ds_distill.config import RunConfig
from ds_distill.losses.base import IGNORE_INDEX
from ds_distill.student import forward_features


def corpus_score(metric: str, hypotheses: list[str], references: list[str]) -> float:
    if metric == "bleu":
        import sacrebleu

        return sacrebleu.corpus_bleu(hypotheses, [references]).score
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in zip(hypotheses, references)]
    return 100.0 * sum(scores) / max(1, len(scores))


@torch.no_grad()
def evaluate(model, dataset, collate, tokenizer, run: RunConfig, synced_gpus: bool = False) -> dict[str, float]:
    """Returns {"loss": mean token cross-entropy, "perplexity", and "bleu"/"rouge" when configured}."""
    model.eval()
    adapter = models.adapter_for(model.config)
    device = next(model.parameters()).device
    metric = run.train.eval_metric
    generate = metric in ("bleu", "rouge") and adapter.kind == "seq2seq"
    loss_sum, token_count, hypotheses, references = 0.0, 0, [], []
    for batch, real_rows in data.eval_batches(dataset, collate, run.train.per_device_eval_batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        features = forward_features(model, adapter, batch)
        labels = features["labels"][:real_rows]
        per_token = F.cross_entropy(
            features["logits"][:real_rows].float().transpose(1, 2),
            labels,
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        loss_sum += float(per_token)
        token_count += int((labels != IGNORE_INDEX).sum())
        if generate:
            outputs = model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                max_new_tokens=run.train.generation_max_length,
                num_beams=run.train.num_beams,
                synced_gpus=synced_gpus,
            )
            hypotheses += tokenizer.batch_decode(outputs[:real_rows], skip_special_tokens=True)
            label_ids = labels.masked_fill(labels == IGNORE_INDEX, tokenizer.pad_token_id)
            references += tokenizer.batch_decode(label_ids, skip_special_tokens=True)
    loss_sum, token_count = dist.all_reduce_sum([loss_sum, token_count])
    loss = loss_sum / max(token_count, 1)
    results = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    if generate:
        gathered = dist.all_gather_objects((hypotheses, references))
        all_hypotheses = [h for hyps, _ in gathered for h in hyps]
        all_references = [r for _, refs in gathered for r in refs]
        results[metric] = corpus_score(metric, all_hypotheses, all_references)
    return results
