"""Losses on output distributions: cross-entropy on labels and logit distillation.

Logit KD: Hinton et al. 2015, "Distilling the Knowledge in a Neural Network" (temperature, T^2 scaling);
reverse KL: Gu et al. 2024, MiniLLM; generalised JSD: Agarwal et al. 2024, GKD; skew KL: Ko et al. 2024,
DistiLLM; total variation distance: Wen et al. 2023, f-divergence minimisation for sequence-level KD.

The logits are the largest tensors of a step ([batch, tokens, vocabulary]: 0.2 GB per 2048-token example of a
49k vocabulary in bf16). The terms here read only the target positions, a chunk of rows at a time, in float32
inside the chunk, and compute the chunk's gradient together with its value (`TargetRows`): no float32 copy of a
whole micro-batch's logits ever exists, and nothing of the teacher is kept for the backward. The trainer
computes all of a run's logit terms in one such pass (`logit_terms`), with the student's LM head folded in
(`head.py`): the chunk's logits are made from the head's input, so the student's whole logits never exist.
"""

from __future__ import annotations

import bisect
import contextlib
import contextvars
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ds_distill.data import IGNORE_INDEX
from ds_distill.objectives import cross_tokenizer, topk
from ds_distill.objectives.base import DistillationLoss, StepTokens
from ds_distill.objectives.divergences import divergence, temperature_scale

CHUNK_ELEMENTS = 2**25
"""Logits per chunk: CHUNK_ELEMENTS // vocabulary rows (682 of a 49k vocabulary, 1044 of T5's 32k), 128 MB per
float32 temporary whatever the vocabulary. Each chunk costs a few dozen kernel launches and one autograd call on
the host, so chunks much smaller than this would leave a GPU waiting (not tuned on a GPU yet)."""


_CHUNK = contextvars.ContextVar("chunk_elements", default=None)


@contextlib.contextmanager
def chunk_elements(count: int):
    """Chunks of `count` logits while open (the planner's traces, tests)."""
    token = _CHUNK.set(count)
    try:
        yield
    finally:
        _CHUNK.reset(token)


def current_chunk_elements() -> int:
    """Logits per chunk now: `chunk_elements`' count where one is open, else CHUNK_ELEMENTS."""
    count = _CHUNK.get()
    return CHUNK_ELEMENTS if count is None else count


def target_positions(features: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(example, position) of every label that counts. The trainer passes their flat indices, computed on the
    host (`target_index`), so the device never waits for a mask's count; without them they are found here."""
    labels = features["labels"]
    index = features.get("target_index")
    if index is None:
        index = (labels.flatten() != IGNORE_INDEX).nonzero().squeeze(1)
    return index.div(labels.shape[1], rounding_mode="floor"), index.remainder(labels.shape[1])


def logit_width(features: dict) -> int:
    """The logits' last dimension, also where the LM head is folded in (`head_input` instead of `logits`)."""
    head = features.get("head")
    return head.out_features if head is not None else features["logits"].shape[-1]


def _float32(rows: torch.Tensor) -> torch.Tensor:
    return rows.to(torch.promote_types(rows.dtype, torch.float32))


class TargetRows(torch.autograd.Function):
    """Over the target rows r, chunk by chunk: each term's sum of fn(logits[r] in float32, *(o[r] for o in
    others)), and the weighted sum of those sums over `divisor`, the one output that gradients flow through.

    `student` holds the logits, or, with a `weight` (the LM head folded in, `head.py`), the head's input: then
    a chunk's logits are `linear(student[r], weight, bias)`, made only for that chunk.

    The gradients are computed in the forward, chunk by chunk (autograd on the chunk), into one buffer of the
    input's dtype for all terms (and float32 sums for the head's weight and bias), as Liger's fused losses do;
    the backward only scales them. So no chunk's float32 temporaries and none of the teacher's logits outlive the
    forward, and nothing is recomputed.
    """

    DIFFERENTIABLE = ("student", "weight", "bias")
    """The inputs gradients flow to (autograd names them by their place in `forward`'s arguments)."""

    @staticmethod
    def forward(ctx, student, example, position, terms, weights, divisor, breaks=None, weight=None, bias=None):
        places = [ARGUMENTS.index(name) for name in TargetRows.DIFFERENTIABLE]
        needs = [place < len(ctx.needs_input_grad) and ctx.needs_input_grad[place] for place in places]
        wide = torch.promote_types(student.dtype, torch.float32)
        # The rows' gradient keeps their dtype, as the logits' did; the head's weight and bias sum chunks in float32.
        grads = [
            None if not need else torch.zeros_like(x, dtype=None if i == 0 else wide)
            for i, (x, need) in enumerate(zip((student, weight, bias), needs))
        ]
        wanted = [i for i, need in enumerate(needs) if need]
        sums = torch.zeros(len(terms), dtype=wide, device=student.device)
        rows = max(1, current_chunk_elements() // (student.shape[-1] if weight is None else weight.shape[0]))
        for start, end in chunks(example.numel(), rows, breaks):
            b, t = example[start:end], position[start:end]
            with torch.enable_grad():
                leaves = [
                    None if x is None else x.detach().requires_grad_(need)
                    for x, need in zip((student[b, t], weight, bias), needs)
                ]
                logits = _float32(leaves[0] if weight is None else F.linear(*leaves))
                values = [fn(logits, *(other[b, t] for other in others)) for fn, others in terms]
                if wanted:
                    weighted = sum(w * value for w, value in zip(weights, values)) / divisor
                    for i, grad in zip(wanted, torch.autograd.grad(weighted, [leaves[i] for i in wanted])):
                        if i == 0:
                            grads[0][b, t] = grad.to(grads[0].dtype)
                        else:
                            grads[i] += grad
                    del grad
            sums += torch.stack(values).detach()
            del leaves, logits, values  # before the next chunk's are made: one chunk's temporaries alive at a time
        ctx.save_for_backward(*grads)
        ctx.dtypes = [None if x is None else x.dtype for x in (student, weight, bias)]
        ctx.mark_non_differentiable(sums)
        return sum(w * value for w, value in zip(weights, sums.unbind())) / divisor, sums

    @staticmethod
    def backward(ctx, grad_output, _):
        grads = {
            name: None if grad is None else grad.mul_(grad_output.to(grad.dtype)).to(dtype)  # scaled in place
            for name, grad, dtype in zip(TargetRows.DIFFERENTIABLE, ctx.saved_tensors, ctx.dtypes)
        }
        return tuple(grads.get(name) for name in ARGUMENTS)


ARGUMENTS = tuple(inspect.signature(TargetRows.forward).parameters)[1:]
"""`TargetRows.forward`'s inputs in order (after ctx)."""


def chunks(total: int, rows: int, breaks: list[int] | None = None):
    """(start, end) of consecutive chunks of `total` rows, `rows` at most; given `breaks` (the row counts after
    which a chunk may end, ascending), each chunk ends at one, the longest that fits or else the shortest."""
    start = 0
    while start < total:
        end = min(start + rows, total)
        if breaks is not None and end < total:
            fitting = bisect.bisect_right(breaks, end) - 1
            end = breaks[fitting] if fitting >= 0 and breaks[fitting] > start else breaks[fitting + 1]
        yield start, end
        start = end


class LogitTerm(DistillationLoss):
    """A term that sums a function of the target positions' logit rows; `logit_terms` computes several at once."""

    counted = ("targets",)
    """The step's tokens (`StepTokens` keys) the term is a mean over."""

    def row_term(self, student: dict, teacher: dict | None) -> tuple[Callable, tuple[torch.Tensor, ...], float]:
        """(fn(student rows in float32, *other rows) -> the term summed over them, the other tensors, indexed as
        the student's logits are, the factor the term's token mean is multiplied by)."""
        raise NotImplementedError

    def forward(self, student, teacher=None, tokens=None):
        total, _ = logit_terms({"term": (self, 1.0)}, student, teacher, tokens)
        return total


def logit_terms(
    terms: dict[str, tuple[LogitTerm, float]], student: dict, teacher: dict | None, tokens: StepTokens = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(sum of weight x term, {name: term}) for logit terms, each a mean over the target tokens (over those of
    the whole step, given `tokens`), computed in one pass over the target rows, with one gradient buffer."""
    example, position = target_positions(student)
    # which of the step's tokens each term is a mean over: all the same but in on-policy runs (KD, CE)
    kinds = [tuple(key for key in loss.counted if tokens and key in tokens) for loss, _ in terms.values()]
    counts = {kind: _step_count(kind, tokens, example.numel()) for kind in kinds}
    fns, scaled = [], []  # Python numbers and the device counts only: no small tensor copied to the device
    for loss, weight in terms.values():
        fn, others, scale = loss.row_term(student, teacher)
        fns.append((fn, others))
        scaled.append((weight * scale, scale))
    weights, divisor = [w for w, _ in scaled], counts[kinds[0]]
    if len(counts) > 1:  # each term divided by its own count
        weights, divisor = [w / counts[kind] for w, kind in zip(weights, kinds)], 1.0
    args = (example, position, fns, weights, divisor, student.get("chunk_breaks"))
    head = student.get("head")  # folded in (`head.py`): called as a module, so ZeRO-3 gathers its weight
    if head is not None:
        total, sums = head(student["head_input"], *args)
    else:
        total, sums = TargetRows.apply(student["logits"], *args)
    return total, {
        name: value * scale / counts[kind] for name, value, (_, scale), kind in zip(terms, sums.unbind(), scaled, kinds)
    }


def _step_count(keys: tuple[str, ...], tokens: StepTokens, local: int):
    """The step's count of the `keys` tokens (on the device); without any, the micro-batch's targets."""
    if not keys:
        return max(local, 1)
    count = tokens[keys[0]]
    for key in keys[1:]:
        count = count + tokens[key]
    return count.clamp_min(1)


class CrossEntropyLoss(LogitTerm):
    """ce: cross-entropy of the student on the labels (the task loss), over the tokenizer's vocabulary."""

    requires_teacher = False

    def row_term(self, student, teacher):
        vocab = self.vocab_size

        def fn(logits, labels):
            return F.cross_entropy(logits[:, :vocab], labels, reduction="sum")

        return fn, (student["labels"],), 1.0


class LogitDistillationLoss(LogitTerm):
    """kd: divergence between teacher and student token distributions at temperature T (scaled by T^2; TVD by T)."""

    counted = ("targets", "sampled")
    vocabulary_match: cross_tokenizer.VocabularyMatch | None = None
    """Across tokenizers (`cross_tokenizer`): the tokens both vocabularies hold, set where the run starts."""

    def row_term(self, student, teacher):
        if self.options.cross_tokenizer:
            return cross_tokenizer.row_term(self.options, self.vocabulary_match, student, teacher)
        # Compared on the tokenizer's vocabulary: rows past it (T5 pads 32100 tokens to 32128) are never targets,
        # and a student built from the teacher has them too, so they would take mass in both softmaxes.
        options = self.options
        if "topk_ids" in teacher:  # a teacher's cached top-k (`topk.py`)
            vocab = self.vocab_size or logit_width(student)

            def sparse(student_logits, ids, top, rest):  # the teacher's values are at the temperature already
                log_student = topk.buckets(student_logits[:, :vocab] / options.temperature, ids)
                log_teacher = topk.teacher_buckets(top, rest)
                return divergence(options.divergence, log_teacher, log_student, options.beta, options.alpha).sum()

            scale = temperature_scale(options.divergence, options.temperature)
            return sparse, tuple(teacher[key] for key in topk.KEYS), scale
        vocab = self.vocab_size or min(logit_width(student), teacher["logits"].shape[-1])

        def fn(student_logits, teacher_logits):
            log_student = F.log_softmax(student_logits[:, :vocab] / options.temperature, dim=-1)
            log_teacher = F.log_softmax(_float32(teacher_logits[:, :vocab]) / options.temperature, dim=-1)
            return divergence(options.divergence, log_teacher, log_student, options.beta, options.alpha).sum()

        return fn, (teacher["logits"],), temperature_scale(options.divergence, options.temperature)
