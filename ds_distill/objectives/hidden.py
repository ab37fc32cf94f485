"""Hidden-state losses on mapped layer pairs; padded positions never count.

cka: 1 - sqrt(linear CKA) (Kornblith et al. 2019, "Similarity of Neural Network Representations Revisited",
used as a distillation loss by Dasgupta & Cohn 2025, "Improving Language Model Distillation through Hidden
State Matching"); linear / hidden_mse: FitNets (Romero et al. 2015) and TinyBERT (Jiao et al. 2020);
hidden_cosine: DistilBERT (Sanh et al. 2019); embedding_mse: HomoDistil (Liang et al. 2023).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ds_distill.errors import ConfigError
from ds_distill.objectives.base import micro_batch_share, token_mean
from ds_distill.objectives.layer_map import LayerPair
from ds_distill.objectives.layerwise import (
    LayerwiseLoss,
    ModelPair,
    build_aligners,
    features,
    normalized,
    resolve_normalization,
)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def cka_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    squared: bool = False,
    dtype=torch.float32,
    eps: float = 1e-8,
    mask: torch.Tensor | None = None,
    normalize: str = "none",
) -> torch.Tensor:
    """1 - sqrt(linear CKA) of token rows (or 1 - CKA with `squared`); `[tokens, d_S]`, `[tokens, d_T]` -> scalar.

    `normalize` (rms | layer: per row, before centring; channel: per column, after it) changes what linear CKA
    weighs: raw rows weigh tokens and channels by their variance, so in a pre-LN residual stream a few massive
    activations decide it.

    `mask` ([tokens] bool) leaves rows out: they are zeroed after centring on the kept rows' mean, which equals
    selecting the rows but keeps the shapes static (no device-to-host sync per layer pair).
    Only d x d products (never tokens x tokens), so the cost is linear in the tokens of the micro-batch.
    Each side is scaled to unit Frobenius norm first; CKA does not change under isotropic scaling, and the
    Gram norms then stay far from float32's range even for activations in the thousands (T5).
    """
    rows_dtype = torch.promote_types(dtype, torch.float32)  # bf16 products: rows centred and scaled in float32
    per_row = normalize if normalize in ("rms", "layer") else "none"
    student = _centred(normalized(student.to(rows_dtype), per_row), mask)
    teacher = _centred(normalized(teacher.to(rows_dtype), per_row), mask)
    if normalize == "channel":  # each channel to unit variance over the kept rows: no outlier channel dominates
        student, teacher = _unit_columns(student), _unit_columns(teacher)
    student = student / student.norm().clamp_min(torch.finfo(rows_dtype).tiny)
    teacher = teacher / teacher.norm().clamp_min(torch.finfo(rows_dtype).tiny)

    def product_norm(a, b):  # the d x d products, in `dtype`; their norms in the rows' precision
        return torch.linalg.matrix_norm((a.to(dtype).T @ b.to(dtype)).to(rows_dtype))

    cross = product_norm(student, teacher)
    student_gram, teacher_gram = product_norm(student, student), product_norm(teacher, teacher)
    denominator = (student_gram + eps) * (teacher_gram + eps)
    similarity = cross**2 / denominator if squared else cross / denominator.sqrt()
    return (1 - similarity).float()


def _centred(rows: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Rows minus the column mean of the kept rows; rows left out become zero. `[tokens, d]` -> `[tokens, d]`."""
    if mask is None:
        return rows - rows.mean(0, keepdim=True)
    keep = mask.unsqueeze(-1)
    rows = rows.where(keep, 0)  # where, not a product: whatever sits in a padded row (even inf) stays out
    mean = rows.sum(0, keepdim=True) / keep.sum().clamp_min(1)
    return (rows - mean).where(keep, 0)


def _unit_columns(centred: torch.Tensor) -> torch.Tensor:
    """Centred rows with every column scaled to unit norm (a constant column stays zero)."""
    return centred / centred.norm(dim=0, keepdim=True).clamp_min(torch.finfo(centred.dtype).tiny)


class CKALoss(LayerwiseLoss):
    """cka: 1 - sqrt(linear CKA) between mapped hidden states over the micro-batch's tokens; any widths, no projection."""

    def __init__(self, options, model_pair: ModelPair, where: str):
        super().__init__(options, model_pair, where)
        self.normalization = resolve_normalization(options.normalize, model_pair, self.notes)

    def pair_loss(self, pair, student, teacher, tokens):
        mask = student[f"{pair.stack}.mask"]
        compared = mask.clone()
        if self.options.skip_first:
            compared[:, 0] = False
        student_hidden, teacher_hidden = features(pair, "hidden", student, teacher)
        value = cka_loss(
            student_hidden.flatten(0, -2),
            teacher_hidden.flatten(0, -2),
            self.options.squared,
            DTYPES[self.options.dtype],
            mask=compared.flatten(),
            normalize=self.normalization,
        )
        # CKA is a statistic of the micro-batch's token rows: it counts by the micro-batch's share of the step
        return micro_batch_share(value, tokens, pair.stack, mask.sum())


class ProjectedHiddenLoss(LayerwiseLoss):
    """Base for losses that compare (optionally projected) student states with teacher states."""

    def __init__(self, options, model_pair: ModelPair, where: str):
        super().__init__(options, model_pair, where)
        if options.rank < 1:
            raise ConfigError(f"{where}.rank must be at least 1")
        self.aligners = build_aligners(
            options.projection, options.per_pair, self.pairs, model_pair.widths(), options.rank, where
        )
        self.normalization = resolve_normalization(options.normalize, model_pair, self.notes)

    def project(self, pair: LayerPair, hidden: torch.Tensor) -> torch.Tensor:
        if self.aligners is None:
            return hidden.float()
        index = self.pairs.index(pair) if len(self.aligners) > 1 else 0
        return self.aligners[index](hidden).float()

    def compare(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Per token: `[tokens, width]` twice -> `[tokens]`."""
        raise NotImplementedError

    def pair_loss(self, pair, student, teacher, tokens):
        # every position is compared and padding weighted out: selecting the real rows would make the host wait
        # for the device to count them
        keep = student[f"{pair.stack}.mask"].flatten()
        student_hidden, teacher_hidden = (rows.flatten(0, -2) for rows in features(pair, "hidden", student, teacher))
        student_rows = normalized(self.project(pair, student_hidden), self.normalization, keep)
        per_token = self.compare(student_rows, normalized(teacher_hidden.float(), self.normalization, keep))
        return token_mean(torch.where(keep, per_token, 0.0).sum(), tokens, pair.stack, keep.sum())


class HiddenMSELoss(ProjectedHiddenLoss):
    """hidden_mse: mean squared error between mapped hidden states, through an optional projection."""

    def compare(self, student, teacher):
        return F.mse_loss(student, teacher, reduction="none").mean(-1)


class LinearLoss(HiddenMSELoss):
    """linear: MSE(A h_S + b, h_T) through one learned projection shared by all pairs (per pair optional)."""


class HiddenCosineLoss(ProjectedHiddenLoss):
    """hidden_cosine: 1 - cosine similarity per token between mapped hidden states (optional projection)."""

    def compare(self, student, teacher):
        return 1 - F.cosine_similarity(student, teacher, dim=-1)


class EmbeddingMSELoss(HiddenMSELoss):
    """embedding_mse: MSE between the embeddings' outputs of each stack (optional projection)."""

    def resolve_pairs(self, spec, model_pair, where):
        if self.own_map:
            raise ConfigError(f"{self.where} always pairs the embeddings of each stack; remove its layer_map")
        return [LayerPair(stack, 0, 0) for stack in model_pair.depths()]
