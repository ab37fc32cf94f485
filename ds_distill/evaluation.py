"""Validation: the student's token loss on held-out data, and BLEU (sacrebleu) or ROUGE of its generations
against the raw reference texts; for a student without an LM head, the distillation objective instead.

Runs on every rank over that rank's share of the set (equal batch counts, which ZeRO-3 needs) and reduces
the sums; under ZeRO-3 `generate` must be told to keep ranks in step (`synced_gpus`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ds_distill import batches, dist, models
from ds_distill.config import RunConfig
from ds_distill.losses.base import IGNORE_INDEX
from ds_distill.student import forward_features


def corpus_score(metric: str, hypotheses: list[str], references: list[str]) -> float:
    """sacrebleu's corpus BLEU (its default 13a tokenisation) or the mean ROUGE-L F1, both 0-100."""
    if metric == "bleu":
        import sacrebleu

        return sacrebleu.corpus_bleu(hypotheses, [references]).score
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in zip(hypotheses, references)]
    return 100.0 * sum(scores) / max(1, len(scores))


@torch.no_grad()
def evaluate(
    model,
    dataset,
    collate,
    tokenizer,
    run: RunConfig,
    synced_gpus: bool = False,
    objective: Callable | None = None,
    texts: dict[str, list[str]] | None = None,
) -> dict[str, float]:
    """Returns {"loss": mean token cross-entropy, "perplexity", and "bleu"/"rouge" when configured}.

    A model without an LM head has no token loss: `objective(batch) -> (total, {term: value})` is evaluated
    instead, giving {"loss", "loss/<term>"}, means over real rows. `texts`, a dict, receives the hypotheses
    and references of all ranks (on every rank).
    """
    model.eval()
    adapter = models.adapter_for(model.config)
    device = next(model.parameters()).device
    generate = objective is None and run.train.eval_metric in ("bleu", "rouge") and adapter.kind == "seq2seq"
    sums, hypotheses, references = defaultdict(float), [], []
    for batch, batch_references, real_rows in batches.eval_batches(
        dataset, collate, run.train.per_device_eval_batch_size
    ):
        batch = {k: v.to(device) for k, v in batch.items()}
        if objective is not None:
            total, terms = objective(batch)
            # terms are means over the batch; the repeated filler rows of the last batch weigh nothing
            for name, value in {"loss": total, **{f"loss/{k}": v for k, v in terms.items()}}.items():
                sums[name] += float(value) * real_rows
            sums["rows"] += real_rows
        else:
            features = forward_features(model, adapter, batch)
            labels = features["labels"][:real_rows]
            logits = features["logits"][:real_rows, ..., : len(tokenizer)].float()
            sums["loss"] += float(
                F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
            )
            sums["tokens"] += int((labels != IGNORE_INDEX).sum())
        if generate:
            outputs = model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                max_new_tokens=run.train.generation_max_length,
                num_beams=run.train.num_beams,
                synced_gpus=synced_gpus,
            )
            hypotheses += tokenizer.batch_decode(outputs[:real_rows], skip_special_tokens=True)
            references += batch_references[:real_rows]
    names = sorted(sums)
    totals = dict(zip(names, dist.all_reduce_sum([sums[name] for name in names])))
    if objective is not None:
        rows = max(totals.pop("rows"), 1)
        return {name: value / rows for name, value in totals.items()}
    loss = totals["loss"] / max(totals["tokens"], 1)
    results = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    if generate:
        gathered = dist.all_gather_objects((hypotheses, references))
        hypotheses = [h for hyps, _ in gathered for h in hyps]
        references = [r for _, refs in gathered for r in refs]
        results[run.train.eval_metric] = corpus_score(run.train.eval_metric, hypotheses, references)
        if texts is not None:
            texts.update(hypotheses=hypotheses, references=references)
    return results
