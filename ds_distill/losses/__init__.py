"""Loss registry: the YAML's `losses:` section names entries of `LOSSES`, each with a `weight` and options.

Every loss is a small `torch.nn.Module` with one signature::

    loss(student: dict[str, Tensor], teacher: dict[str, Tensor] | None) -> Tensor (scalar, float32)

The feature dicts hold what `needs` names (`logits` [batch, seq, vocab], `labels` [batch, seq] with -100 on
positions that do not count), already aligned so that `logits[:, t]` predicts `labels[:, t]`. Losses are
built inside the student's DeepSpeed module, so any parameters they own (projections) train, checkpoint and
resume with the student and stay out of the exported model.
"""

from __future__ import annotations

from typing import Any

import torch

from ds_distill.config import ConfigError, coerce, from_dict, unknown_key_error
from ds_distill.losses.base import DistillationLoss
from ds_distill.losses.logits import CrossEntropyLoss, LogitDistillationLoss

LOSSES: dict[str, type[DistillationLoss]] = {
    "ce": CrossEntropyLoss,
    "kd": LogitDistillationLoss,
}


def build_losses(spec: dict[str, dict[str, Any]], has_teacher: bool) -> tuple[torch.nn.ModuleDict, dict[str, float]]:
    """Builds the configured terms and their weights; raises `ConfigError` on unknown names or options."""
    modules, weights = {}, {}
    for name, options in spec.items():
        if name not in LOSSES:
            raise unknown_key_error(name, sorted(LOSSES), "losses.")
        if not isinstance(options, dict | type(None)):
            raise ConfigError(f"losses.{name} must be a mapping such as {{weight: 1.0}}, got {options!r}")
        options = dict(options or {})
        weight = coerce(options.pop("weight", 1.0), float, f"losses.{name}.weight")
        loss_class = LOSSES[name]
        if loss_class.requires_teacher and not has_teacher:
            raise ConfigError(f"losses.{name} compares with a teacher, but teacher.model_name_or_path is empty")
        modules[name] = loss_class(from_dict(loss_class.Options, options, f"losses.{name}"))
        weights[name] = weight
    return torch.nn.ModuleDict(modules), weights


def describe_losses() -> dict[str, str]:
    """One line per registered loss, for `ds-distill list`."""
    return {name: (cls.__doc__ or "").strip().splitlines()[0] for name, cls in LOSSES.items()}
