"""The one interface every loss implements, and how a micro-batch's term becomes its share of a step's mean."""

from __future__ import annotations

from typing import ClassVar

import torch


class DistillationLoss(torch.nn.Module):
    """A loss term, built from its options (config/losses.py, typed as the config loads). Subclasses set `needs`
    and `requires_teacher`.

    `needs` names the output features a term reads (`logits`, `labels`); layer-wise terms instead list
    captured feature keys in `student_keys` / `teacher_keys` once their layer map is resolved.
    """

    needs: ClassVar[frozenset[str]] = frozenset({"logits", "labels"})
    requires_teacher: ClassVar[bool] = True

    def __init__(self, options, model_pair=None, where: str = "", vocab_size: int | None = None) -> None:
        super().__init__()
        self.options = options
        self.where = where  # e.g. "losses.cka", for error messages
        self.vocab_size = vocab_size  # the tokenizer's: logits past it (a padded embedding) never count
        self.student_keys: set[str] = set()
        self.teacher_keys: set[str] = set()

    def forward(
        self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor] | None, tokens: StepTokens = None
    ) -> torch.Tensor:
        raise NotImplementedError


# Token weighting. A term is a mean over the tokens of the whole optimizer step: every micro-batch of every rank
# divides its sum by the step's token count, which the trainer passes to every term as `tokens`. Summing the
# micro-batches' shares then weighs every token alike, however the step's tokens fall into micro-batches and
# ranks. Without the counts (a loss called on its own, evaluation) a term is the mean over its micro-batch.
StepTokens = dict[str, torch.Tensor] | None
"""The optimizer step's real tokens over all its micro-batches and ranks, by key: "targets" (the labels logit
terms are over) and each stack ("encoder", "decoder"; layer-wise terms). `features.token_counts` (objectives/features.py).
On-policy KD adds "sampled", the student's sampled tokens, which only the KD term is over (`train/on_policy.py`)."""


def token_mean(total: torch.Tensor, tokens: StepTokens, key: str, local_count: torch.Tensor) -> torch.Tensor:
    """A micro-batch's sum over tokens as its share of the step's mean over `key` tokens."""
    step_count = tokens.get(key) if tokens else None
    return total / (local_count if step_count is None else step_count).clamp_min(1)


def micro_batch_share(value: torch.Tensor, tokens: StepTokens, key: str, local_count: torch.Tensor) -> torch.Tensor:
    """A statistic of a whole micro-batch (CKA), weighted by the micro-batch's share of the step's tokens."""
    step_count = tokens.get(key) if tokens else None
    return value if step_count is None else value * local_count / step_count.clamp_min(1)
