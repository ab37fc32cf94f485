"""Width spaces: which axis of which tensor belongs to which set of units, for each family, written once.

Cutting (`surgery/cut.py`), importance ranking (`surgery/importance.py`) and HomoDistil's masks
(`surgery/prune.py`) all read this table, so a family writes its widths here and every user follows. The spaces:

    hidden          the residual stream: one channel set for the whole model (embeddings, norms, every matrix)
    ffn             the feed-forward neurons of one block
    self.q          a self-attention's query projection, [heads x head_dim]; self.k / self.v its keys and values
                    ([key/value heads x head_dim] under grouped-query attention), self.o the output
                    projection's input ([heads x head_dim])
    self.qkv        GPT-2's fused [q | k | v] projection: the same heads in each third
    self.bias       one entry per head (T5's relative position bias)
    cross.*         the same for a decoder's cross-attention
    None            kept whole (vocabulary, positions, buckets, Qwen3's per-head q/k norms)

The unit of a head space is a key/value group: one head without grouped-query attention, or a key/value head
with every query head that reads it. Heads are kept per block (Minitron, HomoDistil), except where a family
shares per-head parameters across a stack's blocks (T5's relative position bias lives in block 0 and serves
every block): there one head set serves the stack. Where heads may narrow (`narrow_heads`), the query/key
channels of a head (they form the attention scores) and its value/output channels are two spaces of their own.

Patterns are matched with fnmatch against parameter names whose block number is replaced by `N`; the first
match wins, and a name no pattern matches is an error (a family's table must cover every tensor).
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

Axes = tuple[str | None, ...]
ATTENTIONS = ("self", "cross")


@dataclass(frozen=True)
class WidthLayout:
    axes: tuple[tuple[str, Axes], ...]
    embedding_outputs: tuple[str, ...] = ()
    """Modules whose outputs enter the residual stream without passing a norm first (HomoDistil masks them)."""
    heads_per_stack: bool = False
    """One head set per stack (per-head parameters shared by its blocks), not one per block."""
    width_scales: tuple[tuple[str, str], ...] = ()
    """(config flag, tensor pattern): where the flag is on, the model multiplies by a power of d_model (T5's tied
    decoder output by d_model ** -0.5, BART's embeddings by sqrt(d_model)). A cut multiplies these tensors by
    sqrt(d_student / d_teacher), so the narrower model computes what the teacher computes on the kept channels
    (a following norm absorbs the factor where it sits before one)."""

    def spaces(self, normalized_name: str) -> Axes | None:
        for pattern, axes in self.axes:
            if fnmatchcase(normalized_name, pattern):
                return axes
        return None

    def scaled(self, name: str, config) -> bool:
        return any(getattr(config, flag, False) and fnmatchcase(name, pattern) for flag, pattern in self.width_scales)


def attention_role(space: str | None) -> tuple[str, str] | None:
    """("self" | "cross", "q" | "k" | "v" | "o" | "qkv" | "bias") for an attention space, else None."""
    if space is None or "." not in space:
        return None
    attention, role = space.split(".")
    return attention, role


# Unit keys, shared by scores (importance, sensitivity), masks and plans:
#   ("hidden",)                                   hidden channels
#   ("ffn", stack, block)                         FFN neurons of a block
#   ("heads", attention, stack, block)            key/value groups of an attention (block None: one per stack)
#   ("qk", attention, stack, block)               [heads, head_dim]: query/key channels of each head (narrowing)
#   ("vo", attention, stack, block)               [heads, head_dim]: value/output channels of each head
HIDDEN = ("hidden",)


def head_key(kind: str, attention: str, stack: str, block: int, layout: WidthLayout) -> tuple:
    return (kind, attention, stack, None if layout.heads_per_stack else block)


T5_WIDTHS = WidthLayout(
    axes=(
        ("*.SelfAttention.q.weight", ("self.q", "hidden")),
        ("*.SelfAttention.k.weight", ("self.k", "hidden")),
        ("*.SelfAttention.v.weight", ("self.v", "hidden")),
        ("*.SelfAttention.o.weight", ("hidden", "self.o")),
        ("*.SelfAttention.relative_attention_bias.weight", (None, "self.bias")),
        ("*.EncDecAttention.q.weight", ("cross.q", "hidden")),
        ("*.EncDecAttention.k.weight", ("cross.k", "hidden")),
        ("*.EncDecAttention.v.weight", ("cross.v", "hidden")),
        ("*.EncDecAttention.o.weight", ("hidden", "cross.o")),
        ("*.DenseReluDense.wi*.weight", ("ffn", "hidden")),
        ("*.DenseReluDense.wo.weight", ("hidden", "ffn")),
        ("*layer_norm.weight", ("hidden",)),
        ("*embed_tokens.weight", (None, "hidden")),
        ("shared.weight", (None, "hidden")),
        ("lm_head.weight", (None, "hidden")),
    ),
    embedding_outputs=("shared",),
    heads_per_stack=True,
    width_scales=(("scale_decoder_outputs", "decoder.final_layer_norm.weight"),),
)

BART_WIDTHS = WidthLayout(
    axes=(
        *(
            (f"*.{module}.{role}_proj.{kind}", ((f"{attention}.{role}", "hidden") if kind == "weight" else (f"{attention}.{role}",)))
            for module, attention in (("self_attn", "self"), ("encoder_attn", "cross"))
            for role in "qkv"
            for kind in ("weight", "bias")
        ),
        ("*.self_attn.out_proj.weight", ("hidden", "self.o")),
        ("*.encoder_attn.out_proj.weight", ("hidden", "cross.o")),
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
    # sqrt(d_model) x token embeddings + positions, then layernorm_embedding: scaling the positions by
    # sqrt(d_student / d_teacher) scales the sum, which the norm takes out
    width_scales=(("scale_embedding", "*embed_positions.weight"),),
)  # fmt: skip

GPT2_WIDTHS = WidthLayout(  # Conv1D weights are [in, out]
    axes=(
        ("*.attn.c_attn.weight", ("hidden", "self.qkv")),
        ("*.attn.c_attn.bias", ("self.qkv",)),
        ("*.attn.c_proj.weight", ("self.o", "hidden")),
        ("*.mlp.c_fc.weight", ("hidden", "ffn")),
        ("*.mlp.c_fc.bias", ("ffn",)),
        ("*.mlp.c_proj.weight", ("ffn", "hidden")),
        ("*.c_proj.bias", ("hidden",)),
        ("*.ln_*", ("hidden",)),
        ("*.wte.weight", (None, "hidden")),
        ("*.wpe.weight", (None, "hidden")),
        ("lm_head.weight", (None, "hidden")),
    ),
    embedding_outputs=("transformer.wte", "transformer.wpe"),
)

LLAMA_WIDTHS = WidthLayout(
    axes=(
        ("*.q_proj.weight", ("self.q", "hidden")),
        ("*.q_proj.bias", ("self.q",)),
        ("*.k_proj.weight", ("self.k", "hidden")),
        ("*.k_proj.bias", ("self.k",)),
        ("*.v_proj.weight", ("self.v", "hidden")),
        ("*.v_proj.bias", ("self.v",)),
        ("*.o_proj.weight", ("hidden", "self.o")),
        ("*.[qk]_norm.weight", (None,)),  # Qwen3: per head, over the head's own width (heads stay whole)
        ("*.gate_proj.weight", ("ffn", "hidden")),
        ("*.up_proj.weight", ("ffn", "hidden")),
        ("*.down_proj.weight", ("hidden", "ffn")),
        ("*norm.weight", ("hidden",)),
        ("*.embed_tokens.weight", (None, "hidden")),
        ("lm_head.weight", (None, "hidden")),
    ),
    embedding_outputs=("model.embed_tokens",),
)

BERT_WIDTHS = WidthLayout(
    axes=(
        ("*.attention.self.query.weight", ("self.q", "hidden")),
        ("*.attention.self.query.bias", ("self.q",)),
        ("*.attention.self.key.weight", ("self.k", "hidden")),
        ("*.attention.self.key.bias", ("self.k",)),
        ("*.attention.self.value.weight", ("self.v", "hidden")),
        ("*.attention.self.value.bias", ("self.v",)),
        ("*.attention.output.dense.weight", ("hidden", "self.o")),
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
        # RoBERTa's masked-LM head
        ("lm_head.dense.weight", ("hidden", "hidden")),
        ("lm_head.layer_norm.*", ("hidden",)),
        ("lm_head.decoder.weight", (None, "hidden")),
        ("lm_head.*bias", (None,)),
    ),
)
