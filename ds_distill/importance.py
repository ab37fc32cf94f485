"""Which hidden channels, heads and FFN neurons matter, read from the teacher's activations on a few batches.

As NVIDIA's Minitron ranks them (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge
Distillation"): a hidden channel by the mean magnitude of the norm layers' outputs in it, summed over all norm
layers; a head by the mean L2 norm of its output (the head's slice of the attention output projection's
input), summed over a stack's blocks, and a channel of a head (for narrower heads) by its mean magnitude there;
an FFN neuron by the mean magnitude of its activation (the input of the
block's down projection). Means run over real tokens only.

    scores = activation_scores(teacher, calibration_batches)   # the dict `slicing.make_plan` takes
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch

from ds_distill import models
from ds_distill.student import model_inputs, stack_masks


def _is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def _stack_of(adapter: models.ModelAdapter, module_name: str) -> str:
    stacks = list(adapter.layout)
    if len(stacks) == 1:
        return stacks[0]
    return "decoder" if "decoder" in module_name.split(".") else "encoder"


@torch.no_grad()
def activation_scores(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict:
    """Scores for `slicing.make_plan`: {"hidden": [d_model], (head space, stack): [heads],
    ("ffn", stack, block): [d_ff]}, from the model's forward on `batches` (eval mode, no gradients)."""
    adapter = models.adapter_for(model.config)
    head_width = adapter.attention_widths(model.config)[0] // adapter.num_heads(model.config)
    sums: dict = defaultdict(float)
    masks: dict[str, torch.Tensor] = {}
    handles = []

    def masked_mean(values: torch.Tensor, stack: str) -> torch.Tensor:
        """[batch, seq, ...] -> [...]: the mean over the stack's real tokens."""
        mask = masks[stack].to(values.device, values.dtype)
        return torch.einsum("bs,bs...->...", mask, values.float()) / mask.sum().clamp_min(1)

    for name, module in model.named_modules():
        stack = _stack_of(adapter, name)
        if _is_norm(module):
            handles.append(
                module.register_forward_hook(
                    lambda m, args, out, stack=stack: sums.__setitem__(
                        "hidden", sums["hidden"] + masked_mean(out.abs(), stack)
                    )
                )
            )
    for stack, layout in adapter.layout.items():
        for block_index, block in enumerate(adapter.blocks(model, stack)):
            for space, path in adapter.widths.head_outputs.items():
                if space == "cross_heads" and stack != "decoder":
                    continue
                key = (space, stack)

                def per_head(m, args, key=key, stack=stack):
                    heads = args[0].unflatten(-1, (-1, head_width)).float().norm(dim=-1)  # [batch, seq, heads]
                    sums[key] = sums[key] + masked_mean(heads, stack)
                    channels = (*key, "channels")  # each channel of each head, for narrower heads
                    sums[channels] = sums[channels] + masked_mean(args[0].abs(), stack)

                handles.append(block.get_submodule(path).register_forward_pre_hook(per_head))
            ffn_input = layout.sites["ffn_intermediate"].path
            key = ("ffn", stack, block_index)
            handles.append(
                block.get_submodule(ffn_input).register_forward_pre_hook(
                    lambda m, args, key=key, stack=stack: sums.__setitem__(
                        key, sums[key] + masked_mean(args[0].abs(), stack)
                    )
                )
            )
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
    finally:
        for handle in handles:
            handle.remove()
    return {key: value.cpu() for key, value in sums.items()}
