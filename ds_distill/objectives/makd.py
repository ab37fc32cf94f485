"""makd: multi-aspect module matching (MaKD), a weighted, optionally staged sum of four aspects per layer pair.

    attention          KL(teacher || student) of self-attention distributions (heads averaged if counts differ)
    hidden             MSE of block outputs
    attention_output   MSE of the self-attention sub-layer outputs
    ffn_output         MSE of the feed-forward sub-layer outputs

The three MSE aspects compare RMS-normalised states where a model is pre-LN (`normalize`, as in hidden_mse).

Student states pass through a low-rank aligner (d_S -> rank -> d_T, one per aspect, shared by the pairs)
wherever the widths differ. `stages` trains some aspects first, e.g. the module terms:

    makd: {weight: 1.0, rank: 64, stages: [{steps: 2000, aspects: [attention_output, ffn_output]}]}

Each stage lasts `steps` optimizer steps; after the last stage every aspect with a non-zero weight counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ds_distill.config.losses import ASPECTS
from ds_distill.objectives.attention import AttentionKLLoss
from ds_distill.objectives.base import token_mean
from ds_distill.objectives.layerwise import (
    Aligner,
    ModelPair,
    features,
    normalized,
    resolve_normalization,
)

SITES = {
    "attention": "attention_probs",
    "hidden": "hidden",
    "attention_output": "attention_output",
    "ffn_output": "ffn_output",
}


class MaKDLoss(AttentionKLLoss):
    """makd: MaKD aspects (attention KL, hidden, attention-output and FFN-output MSE) via low-rank aligners."""

    takes_embeddings = True  # layer 0 contributes its hidden aspect only

    def __init__(self, options, model_pair: ModelPair, where: str):
        super().__init__(options, model_pair, where)
        self.step = 0
        self.normalization = resolve_normalization(options.normalize, model_pair, self.notes)
        student_width, teacher_width = model_pair.widths()
        self.aligners = torch.nn.ModuleDict()
        if student_width != teacher_width:
            for aspect in ("hidden", "attention_output", "ffn_output"):
                if options.aspect_weights[aspect]:  # an aspect at weight 0 is never computed: no idle aligner
                    self.aligners[aspect] = Aligner("low_rank", student_width, teacher_width, options.rank)

    def pair_aspects(self, pair) -> tuple[str, ...]:
        if pair.student == 0 or pair.teacher == 0:  # the embeddings' output: a hidden state, no modules
            return ("hidden",) if self.options.aspect_weights["hidden"] else ()
        return tuple(aspect for aspect in ASPECTS if self.options.aspect_weights[aspect])

    def pair_sites(self, pair):
        return tuple(SITES[aspect] for aspect in self.pair_aspects(pair))

    def active_aspects(self) -> tuple[str, ...]:
        """The aspects of the current stage (the trainer sets `step` before each optimizer step)."""
        start = 0
        for stage in self.options.stages:
            start += int(stage["steps"])
            if self.step < start:
                return tuple(stage["aspects"])
        return ASPECTS

    def set_step(self, step: int) -> None:
        self.step = step

    def pair_loss(self, pair, student, teacher, tokens):
        active = self.active_aspects()
        total = torch.zeros((), device=student[f"{pair.stack}.mask"].device)
        for aspect in self.pair_aspects(pair):
            # an aspect outside the current stage still runs, at weight 0, so every aligner keeps a gradient
            # (DeepSpeed's ZeRO stages expect the same parameters to take part in every step)
            weight = self.options.aspect_weights[aspect] if aspect in active else 0.0
            if aspect == "attention":
                value = super().pair_loss(pair, student, teacher, tokens)
            else:
                keep = student[f"{pair.stack}.mask"].flatten()  # padding weighted out, not selected: no host sync
                pairs = features(pair, SITES[aspect], student, teacher)
                student_states, teacher_states = (states.flatten(0, -2) for states in pairs)
                if aspect in self.aligners:
                    student_states = self.aligners[aspect](student_states)
                student_states = normalized(student_states.float(), self.normalization, keep)
                teacher_states = normalized(teacher_states.float(), self.normalization, keep)
                squared = F.mse_loss(student_states, teacher_states, reduction="none").mean(-1)
                value = token_mean(torch.where(keep, squared, 0.0).sum(), tokens, pair.stack, keep.sum())
            total = total + weight * value
        return total
