"""The student: built or loaded, wrapped with its loss terms, and trained under ZeRO-2 or ZeRO-3.

The DeepSpeed engine wraps `DistillationModule` (student + losses), so one engine forward computes the
student's features and every configured term, and trainable loss parameters (projections) share the
student's optimizer, checkpoints and resumption while staying out of the exported model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

from ds_distill import models
from ds_distill.config.deepspeed import zero3_loading
from ds_distill.config.run import StudentConfig
from ds_distill.objectives.capture import FeatureCapture
from ds_distill.objectives.features import forward_features
from ds_distill.objectives.head import fold_head
from ds_distill.objectives.registry import weighted_terms


def student_hf_config(student: StudentConfig, teacher_hf_config: PretrainedConfig | None) -> PretrainedConfig:
    """The student's architecture, known before any weights load (for validation and parameter counts)."""
    if student.model_name_or_path:
        return models.load_config(student.model_name_or_path, "student")
    dims = student.init.from_teacher
    if dims is not None and dims.strategy == "sliced" and dims.source:
        teacher_hf_config = models.load_config(dims.source, "student.init.from_teacher.source")
    config = models.adapter_for(teacher_hf_config).shrink(teacher_hf_config, dims)
    if dims is not None and dims.tokenizer:  # a vocabulary of its own: its size and special ids
        from ds_distill.data.tokenizers import load_tokenizer
        from ds_distill.surgery.vocabulary import vocabulary_config

        teacher_tokenizer = load_tokenizer(dims.source or teacher_hf_config.name_or_path)
        vocabulary_config(config, teacher_tokenizer, load_tokenizer(dims.tokenizer))
    return config


def build_student(
    student: StudentConfig, hf_config: PretrainedConfig, ds_config: dict[str, Any], seed: int, path: Path | None = None
):
    """The student's Hugging Face model, in fp32 (DeepSpeed keeps the fp32 master weights and casts for bf16):
    loaded from `path` (a sliced student) or `student.model_name_or_path`, else built from `hf_config`."""
    adapter = models.adapter_for(hf_config)
    path = path or student.model_name_or_path
    if path:
        with zero3_loading(ds_config):  # partitioned as it loads under ZeRO-3
            return adapter.from_pretrained(str(path), "student", dtype=torch.float32)
    # Built whole, then partitioned by deepspeed.initialize: zero.Init would draw other random numbers, and a
    # run must start from the same weights under ZeRO-2 and ZeRO-3. A student fits in host memory.
    torch.manual_seed(seed)
    return adapter.from_config(hf_config)


class DistillationModule(torch.nn.Module):
    """Student plus weighted loss terms; `forward` returns (total loss, {term: value})."""

    def __init__(
        self,
        student: torch.nn.Module,
        losses: torch.nn.ModuleDict,
        weights: dict[str, float],
        compile: bool = False,
    ):
        super().__init__()
        self.student = student
        self.losses = losses
        self.weights = weights
        self.adapter = models.adapter_for(student.config)
        keys = set().union(*(loss.student_keys for loss in losses.values()))
        self.capture = FeatureCapture(student, self.adapter, keys) if keys else None
        # Kept out of the module tree (a registered wrapper would list every weight twice in checkpoints);
        # generation and evaluation call the student itself.
        self.__dict__["training_forward"] = torch.compile(student) if compile else student
        self.__dict__["head"] = fold_head(student, self.adapter)  # the student's own module, listed once
        self.kept_heads = None
        """HomoDistil: (stack, block) -> [heads] bool, the heads not pruned; attention losses compare only those."""

    def set_step(self, step: int) -> None:
        """Tells staged losses (makd) the optimizer step about to be taken."""
        for loss in self.losses.values():
            if hasattr(loss, "set_step"):
                loss.set_step(step)

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        teacher_features: dict[str, torch.Tensor] | None = None,
        step_tokens: dict[str, torch.Tensor] | None = None,
        only: tuple[str, ...] | None = None,
    ):
        """`step_tokens`: the optimizer step's token counts over all micro-batches and ranks (`token_counts`
        summed); each term is then this micro-batch's share of the step's mean. Without: micro-batch means.
        `only`: the terms to compute (an on-policy micro-batch's KD), else all."""
        student_features = forward_features(self.training_forward, self.adapter, batch, self.capture, self.head)
        if self.kept_heads is not None:
            for key in [key for key in student_features if key.endswith(".attention_probs")]:
                stack, layer, _ = key.split(".")
                student_features[f"{stack}.{layer}.kept_heads"] = self.kept_heads(stack, int(layer) - 1)
        losses = self.losses if only is None else {name: self.losses[name] for name in only}
        total, terms = weighted_terms(losses, self.weights, student_features, teacher_features, step_tokens)
        return total, {name: value.detach() for name, value in terms.items()}
