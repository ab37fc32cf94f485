"""Which hidden channels, heads and FFN neurons matter, read from the teacher's activations on calibration batches.

As NVIDIA's Minitron ranks them (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge
Distillation"), over real tokens only:
- a hidden channel: the mean magnitude of the hidden-space norms' outputs in it, summed over those norms;
- a head: the mean L2 norm of its output (its slice of the attention output projection's input), per block
  (summed over a stack's blocks where the family shares one head set per stack, T5); a key/value group sums
  its query heads;
- where heads narrow, a head's value/output channel by its mean magnitude there, and its query/key channel c
  by its share of the attention scores: per sequence, mean |q_c| over the queries times mean |k_c| over the
  keys (which is the mean of |q_ic k_jc| over all query-key pairs), averaged over sequences;
- an FFN neuron: the mean magnitude of its activation (the input of the block's down projection).

    scores = activation_scores(teacher, calibration_batches)   # the dict `cut.make_plan` takes

Scores are sums of per-batch means, so ranks can add theirs (`dist.all_reduce`) before ranking.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from functools import partial

import torch

from ds_distill import models
from ds_distill.capture import FeatureCapture, feature_key
from ds_distill.student import model_inputs, stack_masks
from ds_distill.surgery.cut import block_name
from ds_distill.surgery.shapes import shape_of
from ds_distill.surgery.spaces import HIDDEN, head_key


def hidden_norms(model: torch.nn.Module, adapter: models.ModelAdapter):
    """(module name, stack, norm module) for every norm over the hidden channels (not Qwen3's per-head q/k norms)."""
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.nn.Parameter) or weight.dim() != 1:
            continue
        param_name = f"{name}.weight"
        block = block_name(adapter, param_name)
        if adapter.widths.spaces(block[2] if block else param_name) == ("hidden",) and _is_norm(module):
            yield name, _stack_of(adapter, name), module


def _is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def _stack_of(adapter: models.ModelAdapter, module_name: str) -> str:
    stacks = list(adapter.layout)
    if len(stacks) == 1:
        return stacks[0]
    return "decoder" if "decoder" in module_name.split(".") else "encoder"


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[batch, seq, ...] -> [...]: the mean over real tokens."""
    mask = mask.to(values.device, torch.float32)
    return torch.einsum("bs,bs...->...", mask, values.float()) / mask.sum().clamp_min(1)


def _per_sequence_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[batch, seq, width] -> [batch, width]: each sequence's mean over its real tokens."""
    mask = mask.to(values.device, torch.float32)
    return torch.einsum("bs,bsw->bw", mask, values.float()) / mask.sum(1, keepdim=True).clamp_min(1)


@torch.no_grad()
def activation_scores(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict:
    """Scores keyed as `spaces.py` keys units, from the model's forward on `batches` (eval mode, no gradients).
    Works on a ZeRO-3 partitioned model too (hooks see whole activations); every rank must then run the same
    number of batches."""
    adapter = models.adapter_for(model.config)
    shape = shape_of(model.config)
    narrow = adapter.narrow_heads
    sums: dict = defaultdict(float)
    masks: dict[str, torch.Tensor] = {}
    handles = []
    for _, stack, module in hidden_norms(model, adapter):
        handles.append(
            module.register_forward_hook(
                lambda m, args, out, stack=stack: sums.__setitem__(
                    HIDDEN, sums[HIDDEN] + _masked_mean(out.abs(), masks[stack])
                )
            )
        )
    keys = set()
    for stack, depth in shape.depths.items():
        for layer in range(1, depth + 1):
            for attention in shape.attentions(stack):
                keys.add(feature_key(stack, layer, f"{attention}_heads"))
                if narrow:
                    keys |= {feature_key(stack, layer, f"{attention}_{role}") for role in "qk"}
            keys.add(feature_key(stack, layer, "ffn_intermediate"))
    capture = FeatureCapture(model, adapter, keys)
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            masks.update({key.removesuffix(".mask"): mask for key, mask in stack_masks(adapter, batch).items()})
            inputs = model_inputs(batch)
            if adapter.kind != "encoder":
                inputs["use_cache"] = False
            with capture.recording():
                model(**inputs)
            _add_block_scores(sums, capture.pop(), masks, shape, adapter)
    finally:
        capture.remove()
        for handle in handles:
            handle.remove()
    return {key: value.cpu() for key, value in sums.items()}


def _add_block_scores(sums: dict, features: dict, masks: dict, shape, adapter: models.ModelAdapter) -> None:
    for stack, depth in shape.depths.items():
        for block in range(depth):
            layer = block + 1
            for attention in shape.attentions(stack):
                key = partial(head_key, attention=attention, stack=stack, block=block, layout=adapter.widths)
                mask = masks[stack]
                heads = features[feature_key(stack, layer, f"{attention}_heads")].unflatten(-1, (-1, shape.head_dim))
                norms = _masked_mean(heads.float().norm(dim=-1), mask)  # [heads]
                sums[key("heads")] = sums[key("heads")] + norms.view(-1, shape.groups).sum(-1)
                if adapter.narrow_heads:
                    sums[key("vo")] = sums[key("vo")] + _masked_mean(heads.abs(), mask)  # [heads, head_dim]
                    key_mask = masks["encoder"] if attention == "cross" else mask
                    queries = _per_sequence_mean(features[feature_key(stack, layer, f"{attention}_q")].abs(), mask)
                    keys = _per_sequence_mean(features[feature_key(stack, layer, f"{attention}_k")].abs(), key_mask)
                    share = (queries * keys).mean(0).view(shape.heads, shape.head_dim)
                    sums[key("qk")] = sums[key("qk")] + share
            ffn = features[feature_key(stack, layer, "ffn_intermediate")]
            sums[("ffn", stack, block)] = sums[("ffn", stack, block)] + _masked_mean(ffn.abs(), masks[stack])
