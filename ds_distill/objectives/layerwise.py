"""What every layer-wise loss shares: resolving its layer map, naming the features it needs, projections.

A layer-wise loss is built from both models' configs (`ModelPair`, no weights), resolves its layer map there
(its own `layer_map` option, else the class default, else the run's `layer_map`), and then asks for captured
features by key (`capture.py`). `forward` gets the captured features plus `{stack}.mask` ([batch, seq] bool:
the positions that exist), computes one value per layer pair and reduces them (`reduction`: sum or mean).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig

from ds_distill import models
from ds_distill.config.losses import LayerMapConfig
from ds_distill.errors import ConfigError
from ds_distill.objectives import layer_map
from ds_distill.objectives.base import DistillationLoss, StepTokens
from ds_distill.objectives.capture import feature_key
from ds_distill.objectives.layer_map import LayerPair


@dataclass(frozen=True)
class ModelPair:
    """Both models' configs, known before weights load, and the run's default layer map."""

    student: PretrainedConfig
    teacher: PretrainedConfig
    layer_map: LayerMapConfig = field(default_factory=LayerMapConfig)

    def adapters(self) -> tuple[models.ModelAdapter, models.ModelAdapter]:
        return models.adapter_for(self.student), models.adapter_for(self.teacher)

    def depths(self) -> dict[str, tuple[int, int]]:
        """Stack -> (student blocks, teacher blocks), for the stacks both models have."""
        student_adapter, teacher_adapter = self.adapters()
        student, teacher = student_adapter.depths(self.student), teacher_adapter.depths(self.teacher)
        stacks = {stack: (student[stack], teacher[stack]) for stack in student if stack in teacher}
        if not stacks:
            raise ConfigError(
                f"the student ({student_adapter.kind}) and the teacher ({teacher_adapter.kind}) share no stack of "
                "layers, so layer-wise losses cannot pair them"
            )
        return stacks

    def widths(self) -> tuple[int, int]:
        student_adapter, teacher_adapter = self.adapters()
        return student_adapter.width(self.student), teacher_adapter.width(self.teacher)

    def heads(self) -> tuple[int, int]:
        student_adapter, teacher_adapter = self.adapters()
        return student_adapter.num_heads(self.student), teacher_adapter.num_heads(self.teacher)

    def pre_layer_norm(self) -> bool:
        """Whether either model's blocks normalise their input (pre-LN), so that its residual stream is a raw sum."""
        student_adapter, teacher_adapter = self.adapters()
        return (
            self.student.model_type in student_adapter.pre_layer_norm_types
            or self.teacher.model_type in teacher_adapter.pre_layer_norm_types
        )

    def attention_widths(self) -> dict[str, tuple[int, int]]:
        """Role -> (query width, key/value width) of the attention projections."""
        student_adapter, teacher_adapter = self.adapters()
        return {
            "student": student_adapter.attention_widths(self.student),
            "teacher": teacher_adapter.attention_widths(self.teacher),
        }


class LayerwiseLoss(DistillationLoss):
    """Base of losses computed per (student layer, teacher layer) pair."""

    needs = frozenset()
    sites: ClassVar[tuple[str, ...]] = ("hidden",)
    default_layer_map: ClassVar[LayerMapConfig | None] = None
    takes_embeddings: ClassVar[bool] = True  # whether layer 0 (the embeddings' output) has the sites

    def __init__(self, options, model_pair: ModelPair, where: str):
        super().__init__(options, model_pair, where)
        self.notes: list[str] = []  # said once at start, beside the resolved map
        self.own_map = options.layer_map is not None
        spec = options.layer_map or self.default_layer_map or model_pair.layer_map
        self.pairs = self.resolve_pairs(spec, model_pair, f"{where}.layer_map" if self.own_map else "layer_map")
        if not self.pairs:
            raise ConfigError(f"{where}: its layer map leaves no layer pair it can compare; map some blocks")
        for pair in self.pairs:
            for site in self.pair_sites(pair):
                self.student_keys.add(feature_key(pair.stack, pair.student, site))
                self.teacher_keys.add(feature_key(pair.stack, pair.teacher, site))

    def resolve_pairs(self, spec: LayerMapConfig, model_pair: ModelPair, where: str) -> list[LayerPair]:
        pairs = layer_map.resolve(spec, model_pair.depths(), where)
        if self.takes_embeddings:
            return pairs
        embeddings = [p for p in pairs if p.student == 0 or p.teacher == 0]
        if embeddings and self.own_map:
            raise ConfigError(
                f"{where} pairs layer 0 (the embeddings), which has no attention for {self.where}; "
                f"set {self.where}.layer_map.include_embeddings: false"
            )
        return [p for p in pairs if p not in embeddings]  # the run's map serves hidden-state terms too

    def pair_sites(self, pair: LayerPair) -> tuple[str, ...]:
        return self.sites

    def pair_loss(self, pair: LayerPair, student: dict, teacher: dict, tokens: StepTokens) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, student, teacher, tokens=None):
        values = torch.stack([self.pair_loss(pair, student, teacher, tokens) for pair in self.pairs])
        return values.sum() if self.options.reduction == "sum" else values.mean()


def features(pair: LayerPair, site: str, student: dict, teacher: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's and the teacher's captured `site` for one layer pair."""
    return (
        student[feature_key(pair.stack, pair.student, site)],
        teacher[feature_key(pair.stack, pair.teacher, site)],
    )


PRE_LN_NORMALIZATION = "rms"  # what `auto` means where a model is pre-LN: bench/hidden_normalization.py


def resolve_normalization(value: str, model_pair: ModelPair, notes: list[str]) -> str:
    """`auto` as what it means for this pair: RMS normalisation where a model is pre-LN (said in `notes`), none
    where both are post-LN (BERT, BART), whose block outputs leave a layer norm already."""
    if value != "auto":
        return value
    if not model_pair.pre_layer_norm():
        return "none"
    notes.append(
        f"comparing {PRE_LN_NORMALIZATION}-normalised states, as a pre-LN model is paired (normalize: none for raw)"
    )
    return PRE_LN_NORMALIZATION


def normalized(rows: torch.Tensor, how: str, keep: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """Token rows of one micro-batch (`[tokens, width]`), normalised for comparison; `keep` ([tokens] bool) marks
    the real tokens where padding rows are still in (they are left out of the channel statistics).

    rms: each row divided by its root mean square (an RMSNorm without weight, what a pre-LN block's next norm
    reads); layer: each row centred and divided by its std (LayerNorm without weight); channel: each column
    centred and divided by its std over the rows (the micro-batch's real tokens).
    """
    if how == "rms":
        return rows * torch.rsqrt(rows.pow(2).mean(-1, keepdim=True) + eps)
    if how == "layer":
        return F.layer_norm(rows, rows.shape[-1:], eps=eps)
    if how == "channel":
        weight = torch.ones_like(rows[:, :1]) if keep is None else keep.unsqueeze(-1).to(rows.dtype)
        count = weight.sum().clamp_min(1)
        centred = rows - (rows * weight).sum(0, keepdim=True) / count
        return centred * torch.rsqrt((centred.pow(2) * weight).sum(0, keepdim=True) / count + eps)
    return rows


class Aligner(torch.nn.Module):
    """Maps student width to teacher width: `linear` (A h + b) or `low_rank` (d_S -> rank -> d_T)."""

    def __init__(self, kind: str, student_width: int, teacher_width: int, rank: int):
        super().__init__()
        if kind == "linear":
            self.project = torch.nn.Linear(student_width, teacher_width)
        else:
            self.project = torch.nn.Sequential(
                torch.nn.Linear(student_width, rank, bias=False), torch.nn.Linear(rank, teacher_width)
            )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.project(hidden)


PROJECTIONS = ("none", "linear", "low_rank")


def build_aligners(
    kind: str, per_pair: bool, pairs: list[LayerPair], widths: tuple[int, int], rank: int, where: str
) -> torch.nn.ModuleList | None:
    """One shared aligner (index 0), one per pair, or None for `none`; widths must then be equal."""
    if kind not in PROJECTIONS:
        raise ConfigError(f"{where}.projection '{kind}' is unknown; choose one of {', '.join(PROJECTIONS)}")
    student_width, teacher_width = widths
    if kind == "none":
        if student_width != teacher_width:
            raise ConfigError(
                f"{where}: student width {student_width} differs from teacher width {teacher_width}; "
                f"set {where}.projection to linear or low_rank, or use cka (no projection needed)"
            )
        return None
    count = len(pairs) if per_pair else 1
    return torch.nn.ModuleList(Aligner(kind, student_width, teacher_width, rank) for _ in range(count))
