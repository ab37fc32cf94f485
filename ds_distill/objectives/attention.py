"""Attention losses: relations between q/k/v vectors, and attention distributions.

relation: MiniLMv2 (Wang et al. 2021, "MiniLMv2: Multi-Head Self-Attention Relation Distillation");
miniend: the same relations for encoder-decoders, with cross-attention (MiniEnD);
attention_kl: MiniLM (Wang et al. 2020); attention_mse: TinyBERT (Jiao et al. 2020).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from ds_distill.config.losses import LayerMapConfig
from ds_distill.errors import ConfigError
from ds_distill.objectives.base import token_mean
from ds_distill.objectives.layer_map import LayerPair
from ds_distill.objectives.layerwise import LayerwiseLoss, ModelPair, features


def _key_mask(query_mask: torch.Tensor, key_mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """[batch, 1, queries, keys] bool: which keys each query may see."""
    allowed = key_mask[:, None, None, :].expand(-1, 1, query_mask.shape[1], -1)
    if causal:
        allowed = allowed & torch.ones(allowed.shape[-2:], dtype=torch.bool, device=allowed.device).tril()
    return allowed


def relation_log_probs(
    queries: torch.Tensor, keys: torch.Tensor, heads: int, allowed: torch.Tensor, where: str
) -> torch.Tensor:
    """log softmax(X_q X_k^T / sqrt(d_r)) per relation head: `[batch, q, width]`, `[batch, k, width]` ->
    `[batch, heads, q, k]`; disallowed keys get probability 0. The width is split into `heads` slices,
    independently of the model's attention heads."""
    width = queries.shape[-1]
    if width % heads:
        raise ConfigError(f"{where}: {heads} relation heads do not divide a projection width of {width}")
    head_width = width // heads
    queries = queries.float().unflatten(-1, (heads, head_width)).transpose(1, 2)
    keys = keys.float().unflatten(-1, (heads, head_width)).transpose(1, 2)
    scores = queries @ keys.transpose(-1, -2) / head_width**0.5
    return F.log_softmax(scores.masked_fill(~allowed, torch.finfo(scores.dtype).min), dim=-1)


def masked_kl(
    log_teacher: torch.Tensor, log_student: torch.Tensor, allowed: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """KL(teacher || student) per query row over the allowed keys, averaged over heads, summed over real rows.

    `[batch, heads, q, k]` log-probabilities, `allowed` `[batch, 1|heads, q, k]`, `rows` `[batch, q]`.
    """
    per_key = log_teacher.exp() * (log_teacher - log_student)
    per_row = torch.where(allowed, per_key, 0.0).sum(-1).mean(1)  # [batch, q]
    return torch.where(rows, per_row, 0.0).sum()


def relation_kl(
    student: tuple[torch.Tensor, torch.Tensor],
    teacher: tuple[torch.Tensor, torch.Tensor],
    query_mask: torch.Tensor,
    key_mask: torch.Tensor,
    heads: int,
    causal: bool,
    where: str,
) -> torch.Tensor:
    """KL(teacher || student) of one relation, from (queries, keys) of each model (q == k for Q-Q relations),
    averaged over heads, summed over real query rows."""
    allowed = _key_mask(query_mask, key_mask, causal)
    log_student = relation_log_probs(*student, heads, allowed, f"{where} (student)")
    log_teacher = relation_log_probs(*teacher, heads, allowed, f"{where} (teacher)")
    return masked_kl(log_teacher, log_student, allowed, query_mask)


LAST_LAYERS = LayerMapConfig(encoder="last", decoder="last", include_embeddings=False)


class RelationLoss(LayerwiseLoss):
    """relation: MiniLMv2 Q-Q, K-K, V-V self-attention relations, KL(teacher || student), padding/causal masked."""

    sites = ("self_q", "self_k", "self_v")
    default_layer_map = LAST_LAYERS
    takes_embeddings = False
    causal_stacks: ClassVar[frozenset[str]] = frozenset({"decoder"})  # decoder positions see only earlier ones

    def __init__(self, options, model_pair: ModelPair, where: str):
        super().__init__(options, model_pair, where)
        widths = model_pair.attention_widths()
        for role, (query_width, key_value_width) in widths.items():
            for width in {query_width, key_value_width}:
                if width % options.relation_heads:
                    divisor = math.gcd(*(w for pair in widths.values() for w in pair))
                    raise ConfigError(
                        f"{where}.relation_heads {options.relation_heads} does not divide the {role}'s attention "
                        f"projection width {width}; pick a divisor of {divisor}"
                    )

    def relations(self, pair: LayerPair) -> list[tuple[str, str, str]]:
        """(query site, key site, mask kind) per relation. Mask kinds: `self` (the pair's own stack; causal in a
        decoder, which also holds for the decoder queries of cross-attention), `cross_keys` (among the encoder's
        positions, for cross-attention keys and values) and `cross` (decoder queries against encoder keys)."""
        return [("self_q", "self_q", "self"), ("self_k", "self_k", "self"), ("self_v", "self_v", "self")]

    def pair_loss(self, pair, student, teacher, tokens):
        own_mask = student[f"{pair.stack}.mask"]
        values = []
        for query_site, key_site, kind in self.relations(pair):
            student_queries, teacher_queries = features(pair, query_site, student, teacher)
            student_keys, teacher_keys = features(pair, key_site, student, teacher)
            if kind == "cross_keys":  # a relation among the encoder's positions (cross-attention k or v)
                query_stack, key_mask, causal = "encoder", student["encoder.mask"], False
            elif kind == "cross":  # decoder queries against encoder keys
                query_stack, key_mask, causal = pair.stack, student["encoder.mask"], False
            else:
                query_stack, key_mask, causal = pair.stack, own_mask, pair.stack in self.causal_stacks
            query_mask = student[f"{query_stack}.mask"]
            row_sum = relation_kl(
                (student_queries, student_keys),
                (teacher_queries, teacher_keys),
                query_mask,
                key_mask,
                self.options.relation_heads,
                causal,
                f"{self.where} {pair} {query_site}-{key_site}",
            )
            values.append(token_mean(row_sum, tokens, query_stack, query_mask.sum()))
        return torch.stack(values).mean()


class MiniEnDLoss(RelationLoss):
    """miniend: decoder self + cross-attention relations (decoder Q-Q, encoder K-K and V-V), optional encoder self."""

    def resolve_pairs(self, spec, model_pair, where):
        if "encoder" not in model_pair.depths() or "decoder" not in model_pair.depths():
            raise ConfigError(f"{self.where} needs encoder-decoder models; use relation for the others")
        pairs = super().resolve_pairs(spec, model_pair, where)
        if not self.options.encoder_self:
            pairs = [pair for pair in pairs if pair.stack == "decoder"]
        return pairs

    def relations(self, pair):
        relations = super().relations(pair)
        if pair.stack == "decoder":
            relations += [
                ("cross_q", "cross_q", "self"),
                ("cross_k", "cross_k", "cross_keys"),
                ("cross_v", "cross_v", "cross_keys"),
            ]
            if self.options.cross_query_key:
                relations.append(("cross_q", "cross_k", "cross"))
        return relations

    def pair_sites(self, pair):
        return tuple(sorted({site for q, k, _ in self.relations(pair) for site in (q, k)}))


def attention_probs(probs: torch.Tensor, average: bool, kept: torch.Tensor | None = None) -> torch.Tensor:
    """`[batch, heads, q, k]`, or `[batch, 1, q, k]` averaged over the heads (over the `kept` ones, [heads] bool)."""
    probs = probs.float()
    if not average:
        return probs
    if kept is None:
        return probs.mean(1, keepdim=True)
    weights = kept.to(probs.dtype)
    return torch.einsum("bhqk,h->bqk", probs, weights / weights.sum()).unsqueeze(1)


class AttentionDistributionLoss(LayerwiseLoss):
    """Base of attention_kl and attention_mse on self-attention probabilities of mapped layers."""

    sites = ("attention_probs",)
    takes_embeddings = False

    def __init__(self, options, model_pair: ModelPair, where: str):
        super().__init__(options, model_pair, where)
        student_heads, teacher_heads = model_pair.heads()
        self.average_heads = options.average_heads or student_heads != teacher_heads
        if student_heads != teacher_heads and not options.average_heads:
            self.notes.append(
                f"the student has {student_heads} attention heads and the teacher {teacher_heads}; "
                "comparing head-averaged attention distributions"
            )

    def pair_loss(self, pair, student, teacher, tokens):
        mask = student[f"{pair.stack}.mask"]
        student_probs, teacher_probs = features(pair, "attention_probs", student, teacher)
        allowed = _key_mask(mask, mask, causal=False)  # future keys of a decoder have probability 0 on both sides
        # HomoDistil: heads pruned from the student are left out (they no longer attend)
        kept = student.get(f"{pair.stack}.{pair.student}.kept_heads")
        same_heads = student_probs.shape[1] == teacher_probs.shape[1]
        student_probs = attention_probs(student_probs, self.average_heads, kept)
        teacher_probs = attention_probs(teacher_probs, self.average_heads, kept if same_heads else None)
        if kept is not None and not self.average_heads:
            weights = kept.to(student_probs.dtype)
            student_probs = student_probs * weights[:, None, None]
            teacher_probs = teacher_probs * weights[:, None, None]
            scale = kept.numel() / weights.sum()  # the mean over heads becomes a mean over the kept ones
        else:
            scale = 1.0
        row_sum = self.compare(student_probs, teacher_probs, allowed, mask)
        return token_mean(row_sum * scale, tokens, pair.stack, mask.sum())


class AttentionKLLoss(AttentionDistributionLoss):
    """attention_kl: KL(teacher || student) of self-attention distributions on mapped layers (MiniLM)."""

    def compare(self, student, teacher, allowed, rows):
        tiny = torch.finfo(torch.float32).tiny
        return masked_kl(teacher.clamp_min(tiny).log(), student.clamp_min(tiny).log(), allowed, rows)


class AttentionMSELoss(AttentionDistributionLoss):
    """attention_mse: MSE of self-attention distributions on mapped layers (TinyBERT), per query row over its
    keys and heads, then over rows."""

    def compare(self, student, teacher, allowed, rows):
        squared = torch.where(allowed, (student - teacher) ** 2, 0.0).sum(-1)  # [batch, heads, q]
        per_row = squared.mean(1) / allowed[:, 0].sum(-1).clamp_min(1)  # [batch, q]
        return torch.where(rows, per_row, 0.0).sum()
