"""Logit KD against a teacher's top-k: its k most likely ids per target position plus one bucket for the rest.

A teacher cached to disk keeps, per target position, the ids and log-probabilities of its k most likely tokens
and the log of the probability left to the other `vocabulary - k` (as DistillKit and Megatron cache top-k
logits; the rest as one bucket, so both distributions still sum to 1). The divergence is then taken over k + 1
buckets: the student's probabilities of the same k ids, and of everything else.

    teacher = top_k(teacher_logits / T, k)                 # {"topk_ids", "topk_logprobs", "tail_logmass"}
    buckets(student_logits / T, teacher["topk_ids"])       # the student's k + 1 bucket log-probabilities
    teacher_buckets(teacher["topk_logprobs"], teacher["tail_logmass"])   # the teacher's

The teacher's values are those at the run's temperature: the rest's mass at another temperature would need the
individual probabilities it holds (spreading it evenly overstates it thousands of times at T = 2 for a peaked
teacher). With k = the vocabulary this is the online KD exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KEYS = ("topk_ids", "topk_logprobs", "tail_logmass")


def top_k(logits: torch.Tensor, k: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """`logits` [..., vocabulary] (divided by the temperature) -> the k most likely ids (int32), their
    log-probabilities (in `dtype`) and the log of the probability of all other ids (float32; -inf when k is the
    vocabulary)."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    values, ids = log_p.topk(k, dim=-1)
    return {"topk_ids": ids.int(), "topk_logprobs": values.to(dtype), "tail_logmass": _rest(log_p, ids)}


def _rest(log_p: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log of the probability outside `ids`, as a log-sum-exp over those ids (stable where the top-k hold
    nearly all of it, where 1 - sum would cancel)."""
    return log_p.scatter(-1, ids, -math.inf).logsumexp(-1)


def buckets(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The student's log-probabilities `[rows, k + 1]`: of each of `ids` [rows, k], then of all other ids."""
    log_q = F.log_softmax(logits, dim=-1)
    ids = ids.long()
    return _finite(torch.cat([log_q.gather(-1, ids), _rest(log_q, ids).unsqueeze(-1)], dim=-1))


def _finite(log_p: torch.Tensor) -> torch.Tensor:
    """An empty bucket (the rest, when k is the vocabulary) at the lowest float instead of -inf, so that it adds
    0 x (log p - log q) = 0 to a divergence rather than 0 x nan."""
    return log_p.clamp_min(torch.finfo(log_p.dtype).min)


def teacher_buckets(topk_logprobs: torch.Tensor, tail_logmass: torch.Tensor) -> torch.Tensor:
    """The teacher's log-probabilities `[rows, k + 1]` from its top-k `[rows, k]` and the rest's `[rows]`."""
    wide = torch.promote_types(tail_logmass.dtype, torch.float32)  # bf16 values are computed on in float32
    return _finite(torch.cat([topk_logprobs.to(wide), tail_logmass.to(wide).unsqueeze(-1)], dim=-1))
