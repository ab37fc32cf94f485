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
from ds_distill.models.spaces import HIDDEN, head_key
from ds_distill.objectives.capture import feature_key, hook_site
from ds_distill.objectives.features import model_inputs, stack_masks
from ds_distill.surgery.cut import block_name
from ds_distill.surgery.shapes import shape_of


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
    """Scores keyed as `models/spaces.py` keys units, from the model's forward on `batches` (eval mode, no gradients).
    Each block's activations are reduced as they pass, so memory does not grow with depth. Works on a ZeRO-3
    partitioned model too (hooks see whole activations); every rank must then run the same number of batches."""
    adapter = models.adapter_for(model.config)
    shape = shape_of(model.config)
    sums: dict = defaultdict(float)
    masks: dict[str, torch.Tensor] = {}
    pending: dict = {}  # per-sequence mean |q| and |k| of each attention, combined after the forward

    def add(key, value: torch.Tensor) -> None:
        sums[key] = sums[key] + value

    def on(stack: str, layer: int, name: str, receive) -> None:
        module, site = adapter.site(model, stack, layer, name)
        handles.append(hook_site(module, site, feature_key(stack, layer, name), receive))

    handles = [
        module.register_forward_hook(lambda m, a, out, stack=stack: add(HIDDEN, _masked_mean(out.abs(), masks[stack])))
        for _, stack, module in hidden_norms(model, adapter)
    ]
    for stack, depth in shape.depths.items():
        for block in range(depth):
            for attention in shape.attentions(stack):
                key = partial(head_key, attention=attention, stack=stack, block=block, layout=adapter.widths)
                heads = partial(_add_heads, add, key, masks, stack, shape, adapter.narrow_heads)
                on(stack, block + 1, f"{attention}_heads", heads)
                if adapter.narrow_heads:  # a head's query/key channels: their share of the attention scores
                    key_stack = "encoder" if attention == "cross" else stack
                    for role, mask_stack in (("q", stack), ("k", key_stack)):
                        keep = partial(_keep_sequence_means, pending, (key("qk"), role), masks, mask_stack)
                        on(stack, block + 1, f"{attention}_{role}", keep)
            ffn = ("ffn", stack, block)
            on(stack, block + 1, "ffn_intermediate", lambda x, ffn=ffn: add(ffn, _masked_mean(x.abs(), masks[ffn[1]])))
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            masks.update({key.removesuffix(".mask"): mask for key, mask in stack_masks(adapter, batch).items()})
            inputs = model_inputs(batch)
            if adapter.kind != "encoder":
                inputs["use_cache"] = False
            model(**inputs)
            for key in {key for key, _ in pending}:
                add(key, (pending[(key, "q")] * pending[(key, "k")]).mean(0).view(shape.heads, shape.head_dim))
            pending.clear()
    finally:
        for handle in handles:
            handle.remove()
    return {key: value.cpu() for key, value in sums.items()}


def _keep_sequence_means(pending: dict, where, masks: dict, stack: str, values: torch.Tensor) -> None:
    pending[where] = _per_sequence_mean(values.abs(), masks[stack])


def _add_heads(add, key, masks: dict, stack: str, shape, narrow: bool, heads: torch.Tensor) -> None:
    """A head by the norm of its output (a key/value group sums its heads); its value/output channels by
    their magnitudes, where heads narrow."""
    heads = heads.unflatten(-1, (-1, shape.head_dim))  # [batch, seq, heads, head_dim]
    norms = _masked_mean(heads.float().norm(dim=-1), masks[stack])  # [heads]
    add(key("heads"), norms.view(-1, shape.groups).sum(-1))
    if narrow:
        add(key("vo"), _masked_mean(heads.abs(), masks[stack]))  # [heads, head_dim]
