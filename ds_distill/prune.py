"""HomoDistil (Liang et al. 2023, "HomoDistil: Homotopic Task-Agnostic Distillation of Pre-trained Transformers"):
the student starts as the teacher and is pruned step by step to the target width while it distils.

    method: homodistil
    student: {init: {from_teacher: {strategy: sliced}}}          # the teacher itself (or its chosen blocks)
    prune: {d_model: 384, d_ff: 1024, num_heads: 6, steps: 2000}

What is pruned is masked in the activations, so DeepSpeed's weights, gradients and optimizer states stay as they
are: hidden channels (the outputs of embeddings, attention and FFN output projections, and norms, which then
take their statistics over the kept channels only), attention heads (their slice of the attention output
projection's input), channels within heads where the target heads are narrower (queries, keys and values), and
FFN neurons (the input of the down projection). A unit's score is its sensitivity, the sum of |w * dL/dw| over
every weight that reads or writes it (`models/widths.py` says which), smoothed by an exponential moving
average; after each optimizer step the number kept follows a cubic schedule from the full width to the target
at `prune.steps`, dropping the lowest-scoring units still kept. Training then goes on at the target width, and
the export cuts the masked model into a dense one of the target config (`slicing.py`), which computes what the
masked model computes.
"""

from __future__ import annotations

import ast
import math
import types

import torch
from transformers import PretrainedConfig

from ds_distill import models, slicing
from ds_distill.config import FromTeacherConfig, PruneConfig
from ds_distill.errors import ConfigError
from ds_distill.models.fused import RMS_NORMS


def target_config(full: PretrainedConfig, prune: PruneConfig) -> PretrainedConfig:
    """The exported student's config: the full student at the pruned widths."""
    dims = FromTeacherConfig(d_model=prune.d_model, d_ff=prune.d_ff, num_heads=prune.num_heads)
    return models.adapter_for(full).shrink(full, dims)


def kept_count(step: int, full: int, target: int, prune: PruneConfig) -> int:
    """The cubic schedule: all `full` units until `start_step`, `target` from `steps` on."""
    if step <= prune.start_step:
        return full
    progress = min(1.0, (step - prune.start_step) / max(1, prune.steps - prune.start_step))
    return target + math.ceil((full - target) * (1 - progress) ** 3)


def _masked_rms_norm(self, hidden: torch.Tensor) -> torch.Tensor:
    keep = self.prune_mask.to(hidden.dtype)
    variance = (hidden.float().pow(2) * keep).sum(-1, keepdim=True) / keep.sum()
    normed = (hidden.float() * torch.rsqrt(variance + self.variance_epsilon)).to(self.weight.dtype)
    return self.weight * normed * keep


def _masked_layer_norm(self, hidden: torch.Tensor) -> torch.Tensor:
    keep = self.prune_mask.to(hidden.dtype)
    count = keep.sum()
    mean = (hidden * keep).sum(-1, keepdim=True) / count
    centred = (hidden - mean) * keep
    variance = centred.pow(2).sum(-1, keepdim=True) / count
    normed = centred * torch.rsqrt(variance + self.eps)
    return (normed * self.weight + (self.bias if self.bias is not None else 0)) * keep


class Pruner:
    """Masks, sensitivity scores and the schedule for one student (`torch.nn.Module`, full width)."""

    def __init__(self, model: torch.nn.Module, prune: PruneConfig):
        self.model, self.prune = model, prune
        self.adapter = models.adapter_for(model.config)
        full, target = model.config, target_config(model.config, prune)
        self.head_dim = slicing.head_dim(self.adapter, full)
        self.narrow = slicing.head_dim(self.adapter, target) < self.head_dim
        self.groups = slicing.kv_groups(full)
        self.sizes: dict = {"hidden": (self.adapter.width(full), self.adapter.width(target))}
        heads = (self.adapter.num_heads(full) // self.groups, self.adapter.num_heads(target) // self.groups)
        ffn = (slicing._ffn_width(self.adapter, full), slicing._ffn_width(self.adapter, target))
        for stack, depth in self.adapter.depths(full).items():
            for space in self._head_spaces(stack):
                self.sizes[(space, stack)] = heads
                if self.narrow:
                    self.sizes[(space, stack, "channels")] = (self.head_dim, slicing.head_dim(self.adapter, target))
            for block in range(depth):
                self.sizes[("ffn", stack, block)] = ffn
        device = next(model.parameters()).device
        self.masks = {
            key: torch.ones(full_size, dtype=torch.bool, device=device) for key, (full_size, _) in self.sizes.items()
        }
        self.scores = {key: torch.zeros(full_size, dtype=torch.float64) for key, (full_size, _) in self.sizes.items()}
        self.handles = []
        self._install()

    def _head_spaces(self, stack: str) -> tuple[str, ...]:
        return ("heads", "cross_heads") if self.adapter.kind == "seq2seq" and stack == "decoder" else ("heads",)

    # -- masks in the forward ------------------------------------------------------------------------------
    def _head_mask(self, key) -> torch.Tensor:
        """[heads x head_dim] float: a channel is kept when its head (or group) and, for narrow heads, it is."""
        heads = self.masks[key].repeat_interleave(self.groups * self.head_dim)
        if self.narrow:
            heads = heads & self.masks[(*key, "channels")].repeat(heads.numel() // self.head_dim)
        return heads

    def _install(self) -> None:
        hidden = self.masks["hidden"]
        for module in self.model.modules():
            name = type(module).__name__
            if name in RMS_NORMS:
                module.prune_mask = hidden
                module.forward = types.MethodType(_masked_rms_norm, module)
            elif isinstance(module, torch.nn.LayerNorm):
                module.prune_mask = hidden
                module.forward = types.MethodType(_masked_layer_norm, module)
        for path in self.adapter.widths.embedding_outputs:
            self.handles.append(self.model.get_submodule(path).register_forward_hook(self._times_hidden))
        for stack, layout in self.adapter.layout.items():
            for block_index, block in enumerate(self.adapter.blocks(self.model, stack)):
                for space, path in self.adapter.widths.head_outputs.items():
                    if space not in self._head_spaces(stack):
                        continue
                    module = block.get_submodule(path)
                    key = (space, stack)
                    self.handles.append(
                        module.register_forward_pre_hook(lambda m, args, key=key: (args[0] * self._head_mask(key),))
                    )
                    self.handles.append(module.register_forward_hook(self._times_hidden))
                    if self.narrow:  # queries and keys too: the scores must use the kept channels only
                        prefix = "self" if space == "heads" else "cross"
                        for site_name in (f"{prefix}_q", f"{prefix}_k"):
                            site = layout.sites[site_name]
                            self.handles.append(
                                block.get_submodule(site.path).register_forward_hook(
                                    lambda m, args, out, key=key, site=site: self._times_channels(out, key, site)
                                )
                            )
                down = block.get_submodule(layout.sites["ffn_intermediate"].path)
                key = ("ffn", stack, block_index)
                self.handles.append(
                    down.register_forward_pre_hook(lambda m, args, key=key: (args[0] * self.masks[key],))
                )
                self.handles.append(down.register_forward_hook(self._times_hidden))

    def _times_hidden(self, module, args, output):
        return output * self.masks["hidden"]

    def _times_channels(self, output: torch.Tensor, key, site) -> torch.Tensor:
        mask = self._head_mask(key)
        if site.chunk is not None:  # GPT-2's fused [q | k | v]: the same channels in each third (v included)
            mask = mask.repeat(site.chunk[1])
        return output * mask

    # -- scores and the schedule ---------------------------------------------------------------------------
    def observe(self, parameters) -> None:
        """Adds this step's sensitivity |w * dL/dw| to each unit's moving average. `parameters`: (name, full
        fp32 weight, full gradient) for every student weight, the same on every rank."""
        beta = self.prune.score_beta
        current = {key: torch.zeros_like(score) for key, score in self.scores.items()}
        for name, weight, grad in parameters:
            if grad is None:
                continue
            sensitivity = (weight.float() * grad.float()).abs().double().cpu()
            block = slicing._block_name(self.adapter, name)
            spaces = self.adapter.widths.spaces(block[2] if block else name)
            if spaces is None:
                continue
            for axis, space in enumerate(spaces):
                if space is None:
                    continue
                other_axes = [i for i in range(sensitivity.dim()) if i != axis]
                along = sensitivity.sum(other_axes) if other_axes else sensitivity
                self._add(current, space, along, block)
        for key, score in self.scores.items():
            score.mul_(beta).add_(current[key], alpha=1 - beta)

    def _add(self, current: dict, space: str, along: torch.Tensor, block) -> None:
        if space == "hidden":
            current["hidden"] += along
            return
        stack = block[0]
        if space == "ffn":
            current[("ffn", stack, block[1])] += along
            return
        if space == "head":  # T5's relative position bias: one column per head
            current[("heads", stack)] += along
            return
        if space == "qkv_heads":
            along = along.view(3, -1).sum(0)
        space = "heads" if space in ("qkv_heads", "kv_heads") else space
        per_channel = along.view(-1, self.head_dim)  # [heads (or key/value heads), head_dim]
        per_unit = per_channel.sum(-1)
        if self.groups > 1 and per_unit.numel() != self.sizes[(space, stack)][0]:
            per_unit = per_unit.view(-1, self.groups).sum(-1)  # query heads of a group count for the group
        current[(space, stack)] += per_unit
        if self.narrow:
            current[(space, stack, "channels")] += per_channel.sum(0)

    def update(self, step: int) -> None:
        """Tightens the masks to the schedule's counts for the optimizer step just taken (never loosens)."""
        if step % self.prune.every_steps and step < self.prune.steps:
            return
        for key, (full, target) in self.sizes.items():
            count = kept_count(step, full, target, self.prune)
            mask = self.masks[key]
            if int(mask.sum()) <= count:
                continue
            ranking = self.scores[key].masked_fill(~mask.cpu(), -math.inf)
            kept = torch.zeros_like(mask)
            kept[ranking.topk(count).indices.to(mask.device)] = True
            mask.copy_(kept)  # in place: the hooks and norms hold this tensor

    # -- resumption and the final cut ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Masks and scores as tensors under string keys (they load with `weights_only=True`)."""
        state = {f"mask {key!r}": mask.cpu() for key, mask in self.masks.items()}
        return state | {f"score {key!r}": score for key, score in self.scores.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key in self.masks:
            self.masks[key].copy_(state[f"mask {key!r}"])
            self.scores[key].copy_(state[f"score {key!r}"])

    def plan(self) -> slicing.SlicePlan:
        return plan_from_masks(self.model.config, self.masks)


def plan_from_masks(full: PretrainedConfig, masks: dict) -> slicing.SlicePlan:
    """What the masks keep, as a plan that cuts the dense target model from the full student's weights.
    `masks` as a `Pruner` holds them, or as its `state_dict` stored them."""
    stored = {key: mask for key, mask in masks.items() if isinstance(key, str) and key.startswith("mask ")}
    if stored:
        masks = {ast.literal_eval(key.removeprefix("mask ")): mask for key, mask in stored.items()}
    adapter = models.adapter_for(full)
    groups = slicing.kv_groups(full)
    layers = {stack: list(range(depth)) for stack, depth in adapter.depths(full).items()}
    plan = slicing.SlicePlan(layers, _indices(masks["hidden"]), head_dim=slicing.head_dim(adapter, full))
    for key, mask in masks.items():
        if key != "hidden" and key[0] == "ffn":
            plan.ffn[(key[1], key[2])] = _indices(mask)
        elif key != "hidden" and len(key) == 2:
            kept = _indices(mask)
            if groups > 1:
                plan.heads[("kv_heads", key[1])] = kept
                kept = [group * groups + i for group in kept for i in range(groups)]
            plan.heads[key] = kept
    for key, mask in masks.items():
        if key != "hidden" and len(key) == 3 and key[2] == "channels":
            plan.head_channels[key[:2]] = dict.fromkeys(plan.heads[key[:2]], _indices(mask))
    return plan


def _indices(mask: torch.Tensor) -> list[int]:
    return mask.nonzero().flatten().tolist()


def check(prune: PruneConfig, student_ds: dict) -> None:
    """Refuses what pruning cannot do, before any weights load."""
    from ds_distill.ds_config import zero_stage

    if zero_stage(student_ds) == 3:
        raise ConfigError(
            "prune (HomoDistil) reads every weight and gradient whole at each step and keeps masks in step with "
            "them, which a ZeRO-3 student partitions; use ds_configs/student_zero2.json"
        )
    if prune.steps < 1:
        raise ConfigError("prune.steps must be at least 1: the optimizer step at which the target widths are reached")
