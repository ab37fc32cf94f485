"""Scoring a model on a split: its token loss on held-out data, and BLEU (sacrebleu) or ROUGE of its generations
against the raw reference texts; for a student without an LM head, the distillation objective instead. The run's
evaluation during training and `ds-distill evaluate` (evaluation.py) both score through `score`.

Runs on every rank over that rank's share of the set (equal batch counts, which ZeRO-3 needs) and reduces
the sums; under ZeRO-3 `generate` must be told to keep ranks in step (`synced_gpus`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ds_distill import dist, models
from ds_distill.config.run import RunConfig
from ds_distill.data import IGNORE_INDEX, batches
from ds_distill.data.alignment import token_bytes
from ds_distill.objectives.features import forward_features

# what a generation metric reports: BLEU comes with chrF, both from sacrebleu
REPORTED = {"bleu": ("bleu", "chrf"), "rouge": ("rouge",)}


def corpus_score(metric: str, hypotheses: list[str], references: list[str]) -> float:
    """sacrebleu's corpus BLEU (its default 13a tokenisation) or chrF, or the mean ROUGE-L F1, all 0-100."""
    if metric in ("bleu", "chrf"):
        import sacrebleu

        score = sacrebleu.corpus_bleu if metric == "bleu" else sacrebleu.corpus_chrf
        return score(hypotheses, [references]).score
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in zip(hypotheses, references)]
    return 100.0 * sum(scores) / max(1, len(scores))


def described(results: dict[str, float], prefix: str = "") -> str:
    """'loss 0.3632, perplexity 1.438, bleu 33.33': four significant digits, however large (a random model's
    perplexity has nine before the point)."""
    return ", ".join(f"{prefix}{name} {value:.4g}" for name, value in results.items())


def byte_lengths(tokenizer) -> torch.Tensor:
    """UTF-8 bytes of text each id stands for (`alignment.token_bytes`; a SentencePiece word's `▁` counts as
    the space before it), 0 for special tokens (`<unk>` among them: its text is not known from its id): what
    bits per byte divide by."""
    special = set(tokenizer.all_special_ids)
    pieces = token_bytes(tokenizer)
    return torch.tensor([0 if i in special or piece is None else len(piece) for i, piece in enumerate(pieces)])


@torch.no_grad()
def add_token_sums(sums: dict, features: dict, real_rows: int, vocab: int, text_bytes: torch.Tensor | None) -> None:
    """Adds a batch's summed token cross-entropy, its target tokens, the targets its argmax predicts and (given
    each token's UTF-8 byte count) the targets' bytes to `sums`; the filler rows past `real_rows` do not count."""
    labels = features["labels"][:real_rows]
    logits = features["logits"][:real_rows, ..., :vocab].float()
    sums["loss"] += float(
        F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    )
    real = labels != IGNORE_INDEX
    sums["tokens"] += int(real.sum())
    sums["correct"] += int((logits.argmax(-1) == labels)[real].sum())
    if text_bytes is not None:
        sums["bytes"] += int(text_bytes[labels[real]].sum())


def in_dataset_order(hypotheses: list[str], references: list[str]) -> tuple[list[str], list[str]]:
    """Every rank's hypotheses and references, gathered in the dataset's order (on every rank)."""
    gathered = dist.all_gather_objects((hypotheses, references))
    world = len(gathered)  # rank r held rows r, r + world, ...: interleave back into the dataset's order
    order = [(i % world, i // world) for i in range(sum(len(hyps) for hyps, _ in gathered))]
    return [gathered[rank][0][i] for rank, i in order], [gathered[rank][1][i] for rank, i in order]


def score(
    model,
    dataset,
    collate,
    tokenizer,
    run: RunConfig,
    synced_gpus: bool = False,
    objective: Callable | None = None,
    texts: dict[str, list[str]] | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Returns {"loss": mean token cross-entropy, "perplexity", "accuracy" (teacher-forced token accuracy),
    "bits_per_byte" (causal LM and seq2seq: the cross-entropy in bits over the target tokens' UTF-8 bytes, which
    compares models of different tokenizers where perplexity does not), and "bleu" + "chrf" or "rouge" when
    configured}.

    A model without an LM head has no token loss: `objective(batch) -> (total, {term: value})` is evaluated
    instead, giving {"loss", "loss/<term>"}, means over real rows. `texts`, a dict, receives the hypotheses
    and references of all ranks in the dataset's order (on every rank). `progress`: a bar over the batches.
    """
    model.eval()
    adapter = models.adapter_for(model.config)
    device = next(model.parameters()).device
    generate = objective is None and run.train.eval_metric in ("bleu", "rouge") and adapter.kind == "seq2seq"
    sums, hypotheses, references = defaultdict(float), [], []
    text_bytes = byte_lengths(tokenizer).to(device) if adapter.kind != "encoder" else None
    size = run.train.per_device_eval_batch_size
    bar = tqdm(batches.eval_batches(dataset, collate, size), total=-(-len(dataset) // dist.world_size() // size),
                    desc="eval (loss, generation)" if generate else "eval", unit="batch", leave=False,
                    disable=not (dist.is_main() and progress), dynamic_ncols=True)  # fmt: skip
    for batch, batch_references, real_rows in bar:
        batch = {k: v.to(device) for k, v in batch.items()}
        if objective is not None:
            total, terms = objective(batch)
            # terms are means over the batch; the repeated filler rows of the last batch weigh nothing
            for name, value in {"loss": total, **{f"loss/{k}": v for k, v in terms.items()}}.items():
                sums[name] += float(value) * real_rows
            sums["rows"] += real_rows
        else:
            add_token_sums(sums, forward_features(model, adapter, batch), real_rows, len(tokenizer), text_bytes)
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
    results = {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "accuracy": totals["correct"] / max(totals["tokens"], 1),  # of the next (or masked) token, teacher-forced
    }
    if totals.get("bytes"):
        results["bits_per_byte"] = totals["loss"] / math.log(2) / totals["bytes"]
    if generate:
        hypotheses, references = in_dataset_order(hypotheses, references)
        for metric in REPORTED[run.train.eval_metric]:
            results[metric] = corpus_score(metric, hypotheses, references)
        if texts is not None:
            texts.update(hypotheses=hypotheses, references=references)
    return results
