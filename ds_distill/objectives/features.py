"""A batch as the models and the losses read it: a model's inputs, the teacher's view of a batch across
tokenizers, each stack's real positions, the labels aligned with the logits, and one forward's features.

    features = forward_features(model, adapter, batch, capture)   # logits, labels, masks, captured layers

The student (train/student.py), the teacher (train/teacher.py), scoring (train/scoring.py), the teacher cache's
writer and the planner's trace run their forwards through `forward_features`; a cut's importance ranking feeds
the teacher `model_inputs` and reads `stack_masks`.
"""

from __future__ import annotations

import contextlib

import torch

from ds_distill import models
from ds_distill.data import IGNORE_INDEX
from ds_distill.objectives import topk
from ds_distill.objectives.capture import FeatureCapture
from ds_distill.objectives.head import folded

ALIGNMENT_KEYS = ("align_group", "align_teacher_row", "chunk_breaks")
"""Across tokenizers: the groups of a batch (`alignment.AlignedCollator`) and where a logit chunk may end."""
NOT_MODEL_INPUTS = frozenset({"labels", "target_index", "example_index", *topk.KEYS, *ALIGNMENT_KEYS})
"""What a batch carries for the losses and the teacher cache, besides the model's inputs (and the teacher's
tokens, `teacher.*`, across tokenizers)."""


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the Hugging Face forward takes: labels stay out, our losses use them (no wasted internal CE)."""
    return {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS and not k.startswith("teacher.")}


def teacher_view(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch as the teacher reads it: its own tokens where they differ from the student's (`teacher.*`)."""
    if "teacher.input_ids" not in batch:
        return batch
    return {key.removeprefix("teacher."): value for key, value in batch.items() if key.startswith("teacher.")}


def stack_masks(adapter: models.ModelAdapter, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`{stack}.mask` [batch, seq] bool: the positions of each stack that hold real tokens."""
    source = batch["attention_mask"].bool()
    if adapter.kind == "seq2seq":
        # decoder position t reads label t-1 and predicts label t, so it is real exactly when label t is
        target = batch.get("decoder_attention_mask")
        target = target.bool() if target is not None else batch["labels"] != IGNORE_INDEX
        return {"encoder.mask": source, "decoder.mask": target}
    return {f"{next(iter(adapter.layout))}.mask": source}


def aligned_labels(adapter: models.ModelAdapter, labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the logits: a causal LM's logits at t predict the label at t + 1."""
    return labels[:, 1:] if adapter.kind == "causal" else labels


def target_index(adapter: models.ModelAdapter, labels: torch.Tensor) -> torch.Tensor:
    """Flat indices of the aligned labels that count: where the logit losses look. The trainer computes them on
    the host with the batch, so no loss has to wait for the device to count a mask."""
    return (aligned_labels(adapter, labels).flatten() != IGNORE_INDEX).nonzero().squeeze(1)


def token_counts(adapter: models.ModelAdapter, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Real tokens per stack and, with labels, `targets`: the counts the losses' means are over."""
    counts = {key.removesuffix(".mask"): mask.sum() for key, mask in stack_masks(adapter, batch).items()}
    if batch.get("labels") is not None:
        counts["targets"] = (aligned_labels(adapter, batch["labels"]) != IGNORE_INDEX).sum()
    return counts


def forward_features(
    model,
    adapter: models.ModelAdapter,
    batch: dict[str, torch.Tensor],
    capture: FeatureCapture | None = None,
    head: torch.nn.Linear | None = None,
) -> dict[str, torch.Tensor]:
    """Runs `model` on `batch` and returns the features losses read: `logits` aligned so logits[:, t] predicts
    labels[:, t], the stack masks, and what `capture` collected during this forward. With `head` (the model's,
    from `fold_head`), the forward stops before the head: `head_input` holds what it would read, aligned the
    same way, and `head` computes the logits in the logit terms' chunks (objectives/logits.py)."""
    inputs = model_inputs(batch)
    if adapter.kind != "encoder":
        inputs["use_cache"] = False  # no key/value cache to build and hold for a forward that generates nothing
    with capture.recording() if capture else contextlib.nullcontext(), folded(head):
        output = model(**inputs)
    features = {"labels": batch.get("labels"), **stack_masks(adapter, batch)}
    for key in ("target_index", *ALIGNMENT_KEYS):
        if key in batch:
            features[key] = batch[key]
    if capture:
        features.update(capture.pop())
    if hasattr(output, "logits"):  # under `folded(head)` the model's output is the head's input
        rows = "logits" if head is None else "head_input"
        features[rows] = output.logits
        if adapter.kind == "causal" and features["labels"] is not None:
            features[rows] = features[rows][:, :-1]
            features["labels"] = aligned_labels(adapter, features["labels"])
    if head is not None:
        features["head"] = head
    return features
