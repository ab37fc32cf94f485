"""Method presets: one top-level line (`method: cka`) that fills in the loss terms and layer maps of a paper.

    ds-distill distill --config=run.yaml --method=minilmv2
    ds-distill distill --config=run.yaml --method=cka --losses.cka.squared=true --losses.kd.weight=0

What the run config sets itself wins, key by key: `losses.<term>.<option>` and `layer_map.<key>` override the
preset's, extra terms are added, and `weight: 0` turns a preset term off. The saved `config.yaml` of a run
holds the expanded result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LOGITS = {"ce": {"weight": 1.0}, "kd": {"weight": 1.0, "divergence": "forward_kl", "temperature": 1.0}}


@dataclass(frozen=True)
class Method:
    summary: str
    losses: dict[str, dict[str, Any]]
    layer_map: dict[str, Any] | None = None


METHODS: dict[str, Method] = {
    "kd": Method("cross-entropy plus logit KD (Hinton et al. 2015)", {**LOGITS}),
    "cka": Method(
        "CE + KD + 1 - sqrt(CKA) on every uniformly mapped hidden state, embeddings included",
        {**LOGITS, "cka": {"weight": 1.0}},
        {"encoder": "uniform", "decoder": "uniform", "include_embeddings": True},
    ),
    "linear": Method(
        "CE + KD + MSE of hidden states through one learned linear projection (the CKA paper's baseline)",
        {**LOGITS, "linear": {"weight": 1.0}},
        {"encoder": "uniform", "decoder": "uniform", "include_embeddings": True},
    ),
    "minilmv2": Method(
        "Q-Q, K-K, V-V self-attention relations of the last layers (Wang et al. 2021), plus CE + KD",
        {**LOGITS, "relation": {"weight": 1.0}},
    ),
    "miniend_d": Method(
        "MiniEnD-D: decoder self-attention and cross-attention relations of the last layers, plus CE + KD",
        {**LOGITS, "miniend": {"weight": 1.0, "encoder_self": False}},
    ),
    "miniend_e": Method(
        "MiniEnD-E: MiniEnD-D plus the encoder's self-attention relations, plus CE + KD",
        {**LOGITS, "miniend": {"weight": 1.0, "encoder_self": True}},
    ),
    "makd": Method(
        "MaKD: attention KL, hidden, attention-output and FFN-output MSE through low-rank aligners, plus CE + KD",
        {**LOGITS, "makd": {"weight": 1.0}},
        {"encoder": "uniform", "decoder": "uniform", "include_embeddings": False},
    ),
    "homodistil": Method(
        "HomoDistil: the student starts as the teacher and is pruned to the prune: widths while it distils; "
        "task loss + KL + hidden, attention and embedding MSE",
        {
            **LOGITS,
            "hidden_mse": {"weight": 1.0},
            "attention_mse": {"weight": 1.0},
            "embedding_mse": {"weight": 1.0},
        },
        {"encoder": "uniform", "decoder": "uniform", "include_embeddings": False},
    ),
    "tinybert": Method(
        "TinyBERT: embedding, hidden (projected) and attention MSE (on probabilities) per mapped layer, plus logit KD",
        {
            "kd": {"weight": 1.0, "divergence": "forward_kl", "temperature": 1.0},
            "embedding_mse": {"weight": 1.0, "projection": "linear"},
            "hidden_mse": {"weight": 1.0, "projection": "linear"},
            "attention_mse": {"weight": 1.0},
        },
        {"encoder": "uniform", "decoder": "uniform", "include_embeddings": False},
    ),
}
