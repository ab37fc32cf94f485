"""The loss registry: the YAML's `losses:` section names entries of `LOSSES`, each with a `weight` and options
(config/losses.py, `OPTIONS` by the same names).

Every loss is a small `torch.nn.Module` with one signature::

    loss(student: dict[str, Tensor], teacher: dict[str, Tensor] | None, tokens: StepTokens = None)
        -> Tensor (scalar, float32)

A term is a mean over tokens, and in training over all tokens of the optimizer step: each micro-batch returns
its sum divided by the step's count, `tokens` (`base.StepTokens`, `base.token_mean`), so every token weighs
alike whatever the split into micro-batches and ranks. Without it, a term is its micro-batch's mean.

The feature dicts hold what a term asks for: `logits` [batch, seq, vocab] and `labels` [batch, seq] (-100 on
positions that do not count), aligned so that `logits[:, t]` predicts `labels[:, t]`; for layer-wise terms the
captured features of their mapped layers (`capture.py`) and `{stack}.mask`. Losses are built inside the
student's DeepSpeed module, so any parameters they own (projections, aligners) train, checkpoint and resume
with the student and stay out of the exported model.
"""

from __future__ import annotations

from typing import Any

import torch

from ds_distill.config.losses import OPTIONS, LossTerm, parse_losses
from ds_distill.errors import ConfigError
from ds_distill.objectives.attention import AttentionKLLoss, AttentionMSELoss, MiniEnDLoss, RelationLoss
from ds_distill.objectives.base import DistillationLoss, StepTokens
from ds_distill.objectives.hidden import CKALoss, EmbeddingMSELoss, HiddenCosineLoss, HiddenMSELoss, LinearLoss
from ds_distill.objectives.layerwise import LayerwiseLoss, ModelPair
from ds_distill.objectives.logits import CrossEntropyLoss, LogitDistillationLoss, LogitTerm, logit_terms
from ds_distill.objectives.makd import MaKDLoss

LOSSES: dict[str, type[DistillationLoss]] = {
    "ce": CrossEntropyLoss,
    "kd": LogitDistillationLoss,
    "cka": CKALoss,
    "linear": LinearLoss,
    "hidden_mse": HiddenMSELoss,
    "hidden_cosine": HiddenCosineLoss,
    "embedding_mse": EmbeddingMSELoss,
    "relation": RelationLoss,
    "miniend": MiniEnDLoss,
    "attention_kl": AttentionKLLoss,
    "attention_mse": AttentionMSELoss,
    "makd": MaKDLoss,
}


def build_losses(
    losses: dict[str, LossTerm] | dict[str, dict[str, Any]], model_pair: ModelPair | None, vocab_size: int | None = None
) -> tuple[torch.nn.ModuleDict, dict[str, float]]:
    """Builds the configured terms (`RunConfig.losses`, or as the YAML writes them; weight 0 leaves a term out)
    and their weights; `model_pair` is None without a teacher, `vocab_size` is the tokenizer's (logit terms
    ignore rows past it). Raises `ConfigError` on a term that needs a teacher where there is none, and on layer
    maps the models do not fit."""
    modules, weights = {}, {}
    for name, term in parse_losses(losses).items():
        if term.weight == 0:
            continue
        loss_class, where = LOSSES[name], f"losses.{name}"
        if loss_class.requires_teacher and model_pair is None:
            raise ConfigError(f"{where} compares with a teacher, but teacher.model_name_or_path is empty")
        if issubclass(loss_class, LayerwiseLoss):
            modules[name] = loss_class(term.options, model_pair, where)
        else:
            modules[name] = loss_class(term.options, where=where, vocab_size=vocab_size)
        weights[name] = term.weight
    if not modules:
        raise ConfigError("every loss term has weight 0; give at least one term a weight")
    return torch.nn.ModuleDict(modules), weights


def describe_losses() -> dict[str, str]:
    """Each registered loss's docstring, for `ds-distill list`."""
    return {name: (cls.__doc__ or "").strip() for name, cls in LOSSES.items()}


def weighted_terms(
    losses: torch.nn.ModuleDict, weights: dict[str, float], student: dict, teacher: dict | None, tokens: StepTokens
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(sum of weight x term, {name: term}) for one micro-batch. The logit terms share one pass over the logits
    and one gradient buffer (`logits.logit_terms`); every other term runs on its own."""
    logit = {name: (loss, weights[name]) for name, loss in losses.items() if isinstance(loss, LogitTerm)}
    total, values = logit_terms(logit, student, teacher, tokens) if logit else (0.0, {})
    for name, loss in losses.items():
        if name not in logit:
            values[name] = loss(student, teacher, tokens)
            total = total + weights[name] * values[name]
    return total, {name: values[name] for name in losses}


assert LOSSES.keys() == OPTIONS.keys(), "every loss term has its options in config/losses.py, by the same name"
