"""The widths of one model, read from its config: what every space of `models/spaces.py` counts."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig

from ds_distill import models


@dataclass(frozen=True)
class Shape:
    width: int  # hidden channels
    ffn: int  # FFN neurons per block
    heads: int  # query heads per attention
    groups: int  # query heads per key/value head (1 without grouped-query attention)
    head_dim: int
    depths: dict[str, int]  # blocks per stack
    kind: str  # the adapter's: seq2seq | causal | encoder

    @property
    def units(self) -> int:
        """Key/value groups per attention: the unit a head cut keeps or drops."""
        return self.heads // self.groups

    def attentions(self, stack: str) -> tuple[str, ...]:
        return ("self", "cross") if self.kind == "seq2seq" and stack == "decoder" else ("self",)


def shape_of(config: PretrainedConfig) -> Shape:
    adapter = models.adapter_for(config)
    heads = adapter.num_heads(config)
    query_width, key_value_width = adapter.attention_widths(config)
    ffn = getattr(config, adapter.config_fields["d_ff"][0])
    return Shape(
        width=adapter.width(config),
        ffn=4 * adapter.width(config) if ffn is None else ffn,  # GPT-2's n_inner: None means 4 x n_embd
        heads=heads,
        groups=query_width // key_value_width,
        head_dim=query_width // heads,
        depths=adapter.depths(config),
        kind=adapter.kind,
    )
