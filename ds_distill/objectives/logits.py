"""Losses on output distributions: cross-entropy on labels and logit distillation.

Logit KD: Hinton et al. 2015, "Distilling the Knowledge in a Neural Network" (temperature, T^2 scaling);
reverse KL: Gu et al. 2024, MiniLLM; generalised JSD: Agarwal et al. 2024, GKD; skew KL: Ko et al. 2024,
DistiLLM; total variation distance: Wen et al. 2023, f-divergence minimisation for sequence-level KD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ds_distill.errors import ConfigError
from ds_distill.objectives.base import IGNORE_INDEX, DistillationLoss, StepTokens, token_mean


def _target_mean(per_token: torch.Tensor, student: dict, tokens: StepTokens) -> torch.Tensor:
    targets = student["labels"] != IGNORE_INDEX
    return token_mean(torch.where(targets, per_token, 0.0).sum(), tokens, "targets", targets.sum())


class CrossEntropyLoss(DistillationLoss):
    """ce: cross-entropy of the student on the labels (the task loss), over the tokenizer's vocabulary."""

    requires_teacher = False

    def forward(self, student, teacher=None, tokens=None):
        logits = student["logits"][..., : self.vocab_size].float()
        labels = student["labels"]
        per_token = F.cross_entropy(
            logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
        ).view_as(labels)
        return _target_mean(per_token, student, tokens)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dimension, from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(weight_p * p + (1 - weight_p) * q), computed stably."""
    return torch.logaddexp(log_p + math.log(weight_p), log_q + math.log1p(-weight_p))


def divergence(
    name: str, log_teacher: torch.Tensor, log_student: torch.Tensor, beta: float, alpha: float
) -> torch.Tensor:
    """Per-position divergence between teacher and student distributions; `[..., vocab] -> [...]`."""
    if name == "forward_kl":
        return _kl(log_teacher, log_student)
    if name == "reverse_kl":
        return _kl(log_student, log_teacher)
    if name == "jsd":
        log_mixture = _log_mixture(log_teacher, log_student, beta)
        return beta * _kl(log_teacher, log_mixture) + (1 - beta) * _kl(log_student, log_mixture)
    if name == "skew_kl":
        return _kl(log_teacher, _log_mixture(log_teacher, log_student, alpha))
    if name == "tvd":
        return 0.5 * (log_teacher.exp() - log_student.exp()).abs().sum(-1)
    raise AssertionError(name)


DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd")


@dataclass
class KDOptions:
    divergence: str = "forward_kl"
    """forward_kl | reverse_kl | jsd | skew_kl | tvd"""
    temperature: float = 1.0
    beta: float = 0.5
    """jsd: weight of the teacher in the mixture (0 < beta < 1)."""
    alpha: float = 0.1
    """skew_kl: weight of the teacher in the skewed student distribution (0 < alpha < 1)."""

    def __post_init__(self):
        if self.divergence not in DIVERGENCES:
            raise ConfigError(
                f"losses.kd.divergence '{self.divergence}' is unknown; choose one of {', '.join(DIVERGENCES)}"
            )
        if self.temperature <= 0:
            raise ConfigError("losses.kd.temperature must be positive")
        for name in ("beta", "alpha"):
            if not 0 < getattr(self, name) < 1:
                raise ConfigError(f"losses.kd.{name} must lie strictly between 0 and 1")


def temperature_scale(name: str, temperature: float) -> float:
    """What a divergence at temperature T is multiplied by so that its gradients keep their size as T grows.

    The KL family's gradients shrink as 1/T^2 (Hinton et al. 2015), so it gets T^2. TVD's shrink only as 1/T:
    d TVD / d z = (1/T) sum_j sign(q_j - p_j) q_j (1[i = j] - q_i), whose signs do not fade with T, so it gets T.
    """
    return temperature if name == "tvd" else temperature**2


class LogitDistillationLoss(DistillationLoss):
    """kd: divergence between teacher and student token distributions at temperature T (scaled by T^2; TVD by T)."""

    Options = KDOptions

    def forward(self, student, teacher, tokens=None):
        # Compared on the tokenizer's vocabulary: rows past it (T5 pads 32100 tokens to 32128) are never targets,
        # and a student built from the teacher has them too, so they would take mass in both softmaxes.
        vocab = self.vocab_size or min(student["logits"].shape[-1], teacher["logits"].shape[-1])
        temperature = self.options.temperature
        log_student = F.log_softmax(student["logits"][..., :vocab].float() / temperature, dim=-1)
        log_teacher = F.log_softmax(teacher["logits"][..., :vocab].float() / temperature, dim=-1)
        per_token = divergence(self.options.divergence, log_teacher, log_student, self.options.beta, self.options.alpha)
        return _target_mean(per_token, student, tokens) * temperature_scale(self.options.divergence, temperature)
