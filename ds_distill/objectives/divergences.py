"""The token divergences of logit KD, between a teacher's and a student's log-probabilities over one vocabulary
(the same-tokenizer term, logits.py, and the matched part of the cross-tokenizer one, cross_tokenizer.py), and
the temperature scaling that keeps their gradients' size.
"""

from __future__ import annotations

import math

import torch


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


def temperature_scale(name: str, temperature: float) -> float:
    """What a divergence at temperature T is multiplied by so that its gradients keep their size as T grows.

    The KL family's gradients shrink as 1/T^2 (Hinton et al. 2015), so it gets T^2. TVD's shrink only as 1/T:
    d TVD / d z = (1/T) sum_j sign(q_j - p_j) q_j (1[i = j] - q_i), whose signs do not fade with T, so it gets T.
    """
    return temperature if name == "tvd" else temperature**2
