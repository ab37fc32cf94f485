"""The one interface every loss implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

IGNORE_INDEX = -100  # the Hugging Face label convention for positions that do not count


@dataclass
class NoOptions:
    pass


class DistillationLoss(torch.nn.Module):
    """A loss term. Subclasses set `Options` (a dataclass the YAML fills), `needs` and `requires_teacher`.

    `needs` names the output features a term reads (`logits`, `labels`); layer-wise terms instead list
    captured feature keys in `student_keys` / `teacher_keys` once their layer map is resolved.
    """

    Options: ClassVar[type] = NoOptions
    needs: ClassVar[frozenset[str]] = frozenset({"logits", "labels"})
    requires_teacher: ClassVar[bool] = True

    def __init__(self, options, model_pair=None, where: str = "") -> None:
        super().__init__()
        self.options = options
        self.where = where  # e.g. "losses.cka", for error messages
        self.student_keys: set[str] = set()
        self.teacher_keys: set[str] = set()

    def forward(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor] | None) -> torch.Tensor:
        raise NotImplementedError
