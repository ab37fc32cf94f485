"""Where each family keeps the features the layer-wise losses read, as module paths inside one block.

Paths are relative to a block of the stack's `blocks` list, which is relative to `model.base_model` (so a bare
`BertModel` and a `BertForMaskedLM` share one layout). Feature sites:

    hidden                 block output (layer i); the input of block 1 for layer 0 (the embeddings' output)
    self_q/self_k/self_v   outputs of the self-attention's query/key/value projections   [batch, seq, width]
    cross_q/k/v            the same for cross-attention (k/v over the encoder's positions)
    attention_probs        self-attention probabilities (math path, dropout off)          [batch, heads, seq, seq]
    self_heads/cross_heads the heads' concatenated outputs, the input of the attention's output projection
                                                                                   [batch, seq, heads x head_dim]
    attention_output       the self-attention sub-layer's output, before the residual     [batch, seq, d_model]
    ffn_output             the feed-forward sub-layer's output, before the residual       [batch, seq, d_model]
    ffn_intermediate       the feed-forward's activation, the input of its down projection [batch, seq, d_ff]

Features are read where the model computes them, so dropout inside a sub-layer is part of its output (GPT-2's
`attn` and `mlp` outputs include their residual dropout). The exception is attention probabilities: eager
attention returns them after dropout, which zeroes some, so capture switches that dropout off at the mapped
layers (`Site.dropout`) and the losses compare the distributions the model attends with.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Site:
    path: str
    read: str = "output"  # "output" of the module, or the first "input" it receives
    index: int | None = None  # element of a tuple output
    chunk: tuple[int, int] | None = None  # (k, n): the k-th of n equal slices of the last dim (fused q/k/v)
    dropout: str | None = None  # the module's attribute (a rate or an nn.Dropout) for dropout on this output


@dataclass(frozen=True)
class StackLayout:
    blocks: str
    sites: dict[str, Site] = field(default_factory=dict)


def _attention(prefix: str, attention: str, q: str, k: str, v: str) -> dict[str, Site]:
    return {
        f"{prefix}_q": Site(f"{attention}.{q}"),
        f"{prefix}_k": Site(f"{attention}.{k}"),
        f"{prefix}_v": Site(f"{attention}.{v}"),
    }


def _t5(blocks: str, ffn_index: int, cross: bool) -> StackLayout:
    sites = {
        **_attention("self", "layer.0.SelfAttention", "q", "k", "v"),
        # T5Attention returns (output, position_bias, probabilities)
        "attention_probs": Site("layer.0.SelfAttention", index=-1, dropout="dropout"),
        "self_heads": Site("layer.0.SelfAttention.o", read="input"),
        "attention_output": Site("layer.0.SelfAttention", index=0),
        "ffn_output": Site(f"layer.{ffn_index}.DenseReluDense"),
        "ffn_intermediate": Site(f"layer.{ffn_index}.DenseReluDense.wo", read="input"),
    }
    if cross:
        sites.update(_attention("cross", "layer.1.EncDecAttention", "q", "k", "v"))
        sites["cross_heads"] = Site("layer.1.EncDecAttention.o", read="input")
    return StackLayout(blocks, sites)


def _bart(blocks: str, cross: bool) -> StackLayout:
    sites = {
        **_attention("self", "self_attn", "q_proj", "k_proj", "v_proj"),
        "attention_probs": Site("self_attn", index=-1, dropout="dropout"),
        "self_heads": Site("self_attn.out_proj", read="input"),
        "attention_output": Site("self_attn", index=0),
        "ffn_output": Site("fc2"),
        "ffn_intermediate": Site("fc2", read="input"),
    }
    if cross:
        sites.update(_attention("cross", "encoder_attn", "q_proj", "k_proj", "v_proj"))
        sites["cross_heads"] = Site("encoder_attn.out_proj", read="input")
    return StackLayout(blocks, sites)


T5_STACKS = {"encoder": _t5("encoder.block", 1, cross=False), "decoder": _t5("decoder.block", 2, cross=True)}
BART_STACKS = {"encoder": _bart("encoder.layers", cross=False), "decoder": _bart("decoder.layers", cross=True)}
GPT2_STACKS = {
    "decoder": StackLayout(
        "h",
        {
            # one fused projection: [q | k | v] along the last dim
            "self_q": Site("attn.c_attn", chunk=(0, 3)),
            "self_k": Site("attn.c_attn", chunk=(1, 3)),
            "self_v": Site("attn.c_attn", chunk=(2, 3)),
            "attention_probs": Site("attn", index=-1, dropout="attn_dropout"),
            "self_heads": Site("attn.c_proj", read="input"),
            "attention_output": Site("attn", index=0),
            "ffn_output": Site("mlp"),
            "ffn_intermediate": Site("mlp.c_proj", read="input"),
        },
    )
}
LLAMA_STACKS = {
    "decoder": StackLayout(
        "layers",
        {
            # projections before rotary embeddings; k/v are narrower under grouped-query attention
            **_attention("self", "self_attn", "q_proj", "k_proj", "v_proj"),
            "attention_probs": Site("self_attn", index=-1, dropout="attention_dropout"),
            "self_heads": Site("self_attn.o_proj", read="input"),
            "attention_output": Site("self_attn", index=0),
            "ffn_output": Site("mlp"),
            "ffn_intermediate": Site("mlp.down_proj", read="input"),
        },
    )
}
BERT_STACKS = {
    "encoder": StackLayout(
        "encoder.layer",
        {
            **_attention("self", "attention.self", "query", "key", "value"),
            "attention_probs": Site("attention.self", index=-1, dropout="dropout"),
            "self_heads": Site("attention.output.dense", read="input"),
            "attention_output": Site("attention.output.dense"),
            "ffn_output": Site("output.dense"),
            "ffn_intermediate": Site("output.dense", read="input"),
        },
    )
}
