"""Attention probabilities for the mapped layers only: every other layer keeps its fused kernel.

Fused attention (SDPA, flash) never forms the probabilities that the attention terms (relation, MiniEnD,
attention_kl, MaKD) compare. Switching the whole model to eager attention would make every layer hold its
O(tokens^2) scores, and evaluation and generation run eager too. Instead a model whose attention is `sdpa` gets
the registered implementation `ds_distill_sdpa`: Hugging Face builds its masks as for SDPA, and each attention
module either runs SDPA or, where `module.ds_distill_probabilities` is set (the layers a loss reads), the math
path that returns the probabilities.

    use_probabilities(model, [attention modules of the mapped layers])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IMPLEMENTATION = "ds_distill_sdpa"


def _math_attention(module, query, key, value, mask, dropout, scaling, is_causal, position_bias):
    """What eager attention computes, from the masks Hugging Face builds for SDPA: None (full, or causal where
    the module is), boolean (True attends) or additive float."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped key/value heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    if position_bias is not None:  # T5's relative position bias
        scores = scores + position_bias
    queries, keys = scores.shape[-2:]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if mask is None and causal and queries > 1:
        mask = torch.ones(queries, keys, dtype=torch.bool, device=scores.device).tril(keys - queries)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    probabilities = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probabilities = F.dropout(probabilities, p=dropout, training=module.training)
    return torch.matmul(probabilities, value).transpose(1, 2).contiguous(), probabilities


def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
              position_bias=None, **kwargs):  # fmt: skip
    """The attention interface Hugging Face calls: SDPA, or the math path on the modules a loss reads."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if getattr(module, "ds_distill_probabilities", False):
        return _math_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal, position_bias)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, position_bias=position_bias, **kwargs)  # fmt: skip


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def use_probabilities(model: torch.nn.Module, modules: list[torch.nn.Module]) -> None:
    """Makes `modules` (attention modules of `model`) return their probabilities; the rest stay fused. A model
    on another implementation than SDPA goes eager as a whole (flash attention's masks differ)."""
    implementation = model.config._attn_implementation
    if implementation == "eager":
        return
    if implementation not in ("sdpa", IMPLEMENTATION):
        model.set_attn_implementation("eager")
        return
    _register()
    model.set_attn_implementation(IMPLEMENTATION)
    for module in modules:
        module.ds_distill_probabilities = True
