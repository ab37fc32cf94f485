"""How each family's tensors are cut when a student keeps part of the teacher's width, written as data.

Every axis of every tensor belongs to one space:

    hidden        the residual stream: one channel set for the whole model (embeddings, norms, every matrix)
    heads         the self-attention heads of a stack (each head is `head_dim` rows or columns)
    cross_heads   the cross-attention heads of a decoder
    kv_heads      key/value heads under grouped-query attention (each keeps its group of query heads)
    qkv_heads     GPT-2's fused [q | k | v] projection: the same heads in each third
    head          one entry per self-attention head (T5's relative position bias)
    ffn           the feed-forward neurons of one block
    None          kept whole (vocabulary, positions, buckets)

Patterns are matched with fnmatch against parameter names whose block number is replaced by `N`; the first
match wins, and a name no pattern matches is an error (a family's table must cover every tensor).
`head_outputs` names, per head space, the block-relative module whose input is the heads' concatenated
outputs (where their importance is read); feed-forward importance is read at the layout's `ffn_intermediate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Axes = tuple[str | None, ...]


@dataclass(frozen=True)
class WidthLayout:
    axes: tuple[tuple[str, Axes], ...]
    head_outputs: dict[str, str] = field(default_factory=dict)
    embedding_outputs: tuple[str, ...] = ()
    """Modules whose outputs enter the residual stream without passing a norm first (HomoDistil masks them)."""
    queries: tuple[str, ...] = ()
    """Query projections (patterns as in `axes`): narrower heads fold 1 / sqrt(head width) into them."""

    def spaces(self, normalized_name: str) -> Axes | None:
        from fnmatch import fnmatchcase

        for pattern, axes in self.axes:
            if fnmatchcase(normalized_name, pattern):
                return axes
        return None


T5 = WidthLayout(
    axes=(
        ("*.SelfAttention.[qkv].weight", ("heads", "hidden")),
        ("*.SelfAttention.o.weight", ("hidden", "heads")),
        ("*.SelfAttention.relative_attention_bias.weight", (None, "head")),
        ("*.EncDecAttention.[qkv].weight", ("cross_heads", "hidden")),
        ("*.EncDecAttention.o.weight", ("hidden", "cross_heads")),
        ("*.DenseReluDense.wi*.weight", ("ffn", "hidden")),
        ("*.DenseReluDense.wo.weight", ("hidden", "ffn")),
        ("*layer_norm.weight", ("hidden",)),
        ("*embed_tokens.weight", (None, "hidden")),
        ("shared.weight", (None, "hidden")),
        ("lm_head.weight", (None, "hidden")),
    ),
    head_outputs={"heads": "layer.0.SelfAttention.o", "cross_heads": "layer.1.EncDecAttention.o"},
    embedding_outputs=("shared",),
)

BART = WidthLayout(
    axes=(
        ("*.self_attn.[qkv]_proj.weight", ("heads", "hidden")),
        ("*.self_attn.[qkv]_proj.bias", ("heads",)),
        ("*.self_attn.out_proj.weight", ("hidden", "heads")),
        ("*.encoder_attn.[qkv]_proj.weight", ("cross_heads", "hidden")),
        ("*.encoder_attn.[qkv]_proj.bias", ("cross_heads",)),
        ("*.encoder_attn.out_proj.weight", ("hidden", "cross_heads")),
        ("*.out_proj.bias", ("hidden",)),
        ("*.fc1.weight", ("ffn", "hidden")),
        ("*.fc1.bias", ("ffn",)),
        ("*.fc2.weight", ("hidden", "ffn")),
        ("*.fc2.bias", ("hidden",)),
        ("*layer_norm*", ("hidden",)),
        ("*layernorm_embedding.*", ("hidden",)),
        ("*embed_tokens.weight", (None, "hidden")),
        ("*embed_positions.weight", (None, "hidden")),
        ("*shared.weight", (None, "hidden")),
        ("lm_head.weight", (None, "hidden")),
        ("final_logits_bias", (None, None)),
    ),
    head_outputs={"heads": "self_attn.out_proj", "cross_heads": "encoder_attn.out_proj"},
    queries=("*.q_proj.weight", "*.q_proj.bias"),
)

GPT2 = WidthLayout(  # Conv1D weights are [in, out]
    axes=(
        ("*.attn.c_attn.weight", ("hidden", "qkv_heads")),
        ("*.attn.c_attn.bias", ("qkv_heads",)),
        ("*.attn.c_proj.weight", ("heads", "hidden")),
        ("*.mlp.c_fc.weight", ("hidden", "ffn")),
        ("*.mlp.c_fc.bias", ("ffn",)),
        ("*.mlp.c_proj.weight", ("ffn", "hidden")),
        ("*.c_proj.bias", ("hidden",)),
        ("*.ln_*", ("hidden",)),
        ("*.wte.weight", (None, "hidden")),
        ("*.wpe.weight", (None, "hidden")),
        ("lm_head.weight", (None, "hidden")),
    ),
    head_outputs={"heads": "attn.c_proj"},
    embedding_outputs=("transformer.wte", "transformer.wpe"),
    queries=("*.attn.c_attn.weight", "*.attn.c_attn.bias"),  # the first third of [q | k | v]
)

LLAMA = WidthLayout(
    axes=(
        ("*.q_proj.weight", ("heads", "hidden")),
        ("*.q_proj.bias", ("heads",)),
        ("*.[kv]_proj.weight", ("kv_heads", "hidden")),
        ("*.[kv]_proj.bias", ("kv_heads",)),
        ("*.o_proj.weight", ("hidden", "heads")),
        ("*.[qk]_norm.weight", (None,)),  # Qwen3: per head, over the head's own width
        ("*.gate_proj.weight", ("ffn", "hidden")),
        ("*.up_proj.weight", ("ffn", "hidden")),
        ("*.down_proj.weight", ("hidden", "ffn")),
        ("*norm.weight", ("hidden",)),
        ("*.embed_tokens.weight", (None, "hidden")),
        ("lm_head.weight", (None, "hidden")),
    ),
    head_outputs={"heads": "self_attn.o_proj"},
    embedding_outputs=("model.embed_tokens",),
)

BERT = WidthLayout(
    axes=(
        ("*.attention.self.*.weight", ("heads", "hidden")),
        ("*.attention.self.*.bias", ("heads",)),
        ("*.attention.output.dense.weight", ("hidden", "heads")),
        ("*.intermediate.dense.weight", ("ffn", "hidden")),
        ("*.intermediate.dense.bias", ("ffn",)),
        ("*.output.dense.weight", ("hidden", "ffn")),
        ("*.dense.bias", ("hidden",)),
        ("*LayerNorm.*", ("hidden",)),
        ("*_embeddings.weight", (None, "hidden")),
        ("*predictions.transform.dense.weight", ("hidden", "hidden")),
        ("*pooler.dense.weight", ("hidden", "hidden")),
        ("*predictions.decoder.weight", (None, "hidden")),
        ("*predictions*bias", (None,)),
        ("*seq_relationship.weight", (None, "hidden")),
        ("*seq_relationship.bias", (None,)),
    ),
    head_outputs={"heads": "attention.output.dense"},
    queries=("*.attention.self.query.weight", "*.attention.self.query.bias"),
)
