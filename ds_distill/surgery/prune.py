"""HomoDistil (Liang et al. 2023, "HomoDistil: Homotopic Task-Agnostic Distillation of Pre-trained Transformers"):
the student starts as the teacher and is pruned step by step to the target width while it distils.

    method: homodistil
    student: {init: {from_teacher: {strategy: sliced}}}          # the teacher itself (or its chosen blocks)
    prune: {d_model: 384, d_ff: 1024, num_heads: 6, steps: 2000}

What is pruned is masked in the activations, so DeepSpeed's weights, gradients and optimizer states stay as they
are. The units are those of `models/spaces.py`: hidden channels (the outputs of embeddings, attention and FFN output
projections, and norms, which then take their statistics over the kept channels only), key/value groups of
heads per block (per stack for T5; their queries, keys and values are masked too, so a pruned head neither
attends nor passes gradients to the residual stream, and attention losses leave it out), channels within heads where the
target heads are narrower (query/key and value/output channels apart, one set per block), and FFN neurons
(the input of the down projection). A unit's score is its sensitivity, the sum of |w * dL/dw| over every weight
that reads or writes it, counting only the weights' kept rows and columns, smoothed by an exponential moving
average; every `every_steps` optimizer steps until `prune.steps` the number kept follows a cubic schedule from
the full width to the target, dropping the lowest-scoring units still kept. Training then goes on at the
target width, and the export cuts the masked model into a dense one of the target config (`cut.py`), which
computes what the masked model computes.
"""

from __future__ import annotations

import ast
import math
import types
from functools import partial

import torch
from transformers import PretrainedConfig

from ds_distill import models
from ds_distill.config.run import FromTeacherConfig, PruneConfig
from ds_distill.errors import ConfigError
from ds_distill.models.spaces import HIDDEN, attention_role, head_key
from ds_distill.surgery.cut import AttentionCut, SlicePlan, block_name
from ds_distill.surgery.importance import hidden_norms
from ds_distill.surgery.shapes import shape_of


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
        self.full, target = shape_of(model.config), shape_of(target_config(model.config, prune))
        self.narrow = target.head_dim < self.full.head_dim
        self.sizes: dict = {HIDDEN: (self.full.width, target.width)}
        for stack, depth in self.full.depths.items():
            for block in range(depth):
                self.sizes[("ffn", stack, block)] = (self.full.ffn, target.ffn)
                for attention in self.full.attentions(stack):
                    self.sizes[self._key("heads", attention, stack, block)] = (self.full.units, target.units)
                    if self.narrow:
                        for kind in ("qk", "vo"):
                            self.sizes[self._key(kind, attention, stack, block)] = (self.full.head_dim, target.head_dim)
        device = next(model.parameters()).device
        self.masks = {key: torch.ones(full, dtype=torch.bool, device=device) for key, (full, _) in self.sizes.items()}
        self.scores = {key: torch.zeros(full, dtype=torch.float64) for key, (full, _) in self.sizes.items()}
        self.handles = []
        self._install()

    def _key(self, kind: str, attention: str, stack: str, block: int) -> tuple:
        return head_key(kind, attention, stack, block, self.adapter.widths)

    # -- masks in the forward ------------------------------------------------------------------------------
    def _channels(self, attention: str, stack: str, block: int, role: str) -> torch.Tensor:
        """The keep mask along a projection's head axis for `role` (q, k, v, o), [heads or units x head_dim]."""
        units = self.masks[self._key("heads", attention, stack, block)]
        per_head = units.repeat_interleave(self.full.groups) if role in ("q", "o") else units
        keep = per_head.repeat_interleave(self.full.head_dim)
        if self.narrow:
            kind = "qk" if role in ("q", "k") else "vo"
            keep = keep & self.masks[self._key(kind, attention, stack, block)].repeat(per_head.numel())
        return keep

    def kept_heads(self, stack: str, block: int) -> torch.Tensor:
        """[heads] bool: the self-attention heads of a block still kept (attention losses compare only those)."""
        return self.masks[self._key("heads", "self", stack, block)].repeat_interleave(self.full.groups)

    def _install(self) -> None:
        hidden = self.masks[HIDDEN]
        for _, _, module in hidden_norms(self.model, self.adapter):
            module.prune_mask = hidden
            if isinstance(module, torch.nn.LayerNorm):
                module.forward = types.MethodType(_masked_layer_norm, module)
            else:  # T5's, mT5's and the Llama family's RMS norms
                module.forward = types.MethodType(_masked_rms_norm, module)
        for path in self.adapter.widths.embedding_outputs:
            self.handles.append(self.model.get_submodule(path).register_forward_hook(self._times_hidden))
        for stack, depth in self.full.depths.items():
            for block in range(depth):
                layer = block + 1
                for attention in self.full.attentions(stack):
                    heads, _ = self.adapter.site(self.model, stack, layer, f"{attention}_heads")
                    self.handles.append(
                        heads.register_forward_pre_hook(
                            lambda m, args, where=(attention, stack, block): (args[0] * self._channels(*where, "o"),)
                        )
                    )
                    self.handles.append(heads.register_forward_hook(self._times_hidden))
                    # a pruned head's queries, keys and values are masked too: it attends nowhere, and no term
                    # (attention probabilities, q/k/v relations) passes a gradient back through it
                    for role in "qkv":
                        module, site = self.adapter.site(self.model, stack, layer, f"{attention}_{role}")
                        self.handles.append(
                            module.register_forward_hook(
                                lambda m, args, out, where=(attention, stack, block, role), site=site: self._times_part(
                                    out, self._channels(*where), site
                                )
                            )
                        )
                down, _ = self.adapter.site(self.model, stack, layer, "ffn_intermediate")
                key = ("ffn", stack, block)
                self.handles.append(
                    down.register_forward_pre_hook(lambda m, args, key=key: (args[0] * self.masks[key],))
                )
                self.handles.append(down.register_forward_hook(self._times_hidden))

    def _times_hidden(self, module, args, output):
        return output * self.masks[HIDDEN]

    @staticmethod
    def _times_part(output: torch.Tensor, keep: torch.Tensor, site) -> torch.Tensor:
        if site.chunk is None:
            return output * keep
        part, parts = site.chunk  # GPT-2's fused [q | k | v]: only this third
        ones = torch.ones_like(keep)
        return output * torch.cat([keep if i == part else ones for i in range(parts)])

    # -- scores and the schedule ---------------------------------------------------------------------------
    def scoring(self, step: int) -> bool:
        """Whether the optimizer step `step` (1-based, about to be taken) tightens masks, so its gradient is scored."""
        return self.prune.start_step < step <= self.prune.steps and (
            step % self.prune.every_steps == 0 or step == self.prune.steps
        )

    @torch.no_grad()
    def observe(self, sensitivities, reduce=None) -> None:
        """Adds this step's sensitivity |w * dL/dw| to each unit's moving average. `sensitivities`: (name,
        |w * dL/dw|) for every student weight, whole, or each rank its own part with zeros elsewhere and
        `reduce` summing the per-unit vectors over ranks (so no weight or gradient is gathered whole). Only kept
        rows and columns count: a hidden channel earns nothing for feeding a head already pruned."""
        beta = self.prune.score_beta
        current = {key: torch.zeros_like(score) for key, score in self.scores.items()}
        for name, sensitivity in sensitivities:
            block = block_name(self.adapter, name)
            spaces = self.adapter.widths.spaces(block[2] if block else name)
            if spaces is None or all(space is None for space in spaces):
                continue
            where = (block[0], block[1]) if block else None
            sensitivity = sensitivity.double().cpu()
            keeps = [None if space is None else self._keep_along(space, where).cpu() for space in spaces]
            for axis, space in enumerate(spaces):
                if space is None:
                    continue
                along = sensitivity
                for other, keep in enumerate(keeps):
                    if other != axis and keep is not None:
                        shape = [1] * along.dim()
                        shape[other] = -1
                        along = along * keep.view(shape)
                along = along.sum([i for i in range(along.dim()) if i != axis]) if along.dim() > 1 else along
                self._add(current, space, along, where)
        if reduce is not None:
            current = reduce(current)
        for key, score in self.scores.items():
            score.mul_(beta).add_(current[key], alpha=1 - beta)

    def _keep_along(self, space: str, where) -> torch.Tensor:
        if space == "hidden":
            return self.masks[HIDDEN]
        if space == "ffn":
            return self.masks[("ffn", *where)]
        attention, role = attention_role(space)
        if role == "bias":
            return self.masks[self._key("heads", attention, *where)].repeat_interleave(self.full.groups)
        if role == "qkv":
            return torch.cat([self._channels(attention, *where, r) for r in "qkv"])
        return self._channels(attention, *where, role)

    def _add(self, current: dict, space: str, along: torch.Tensor, where) -> None:
        if space in ("hidden", "ffn"):
            current[HIDDEN if space == "hidden" else ("ffn", *where)] += along
            return
        attention, role = attention_role(space)
        if role == "qkv":
            for part, sub in zip(along.view(3, -1), "qkv"):
                self._add(current, f"{attention}.{sub}", part, where)
            return
        heads = self._key("heads", attention, *where)
        if role == "bias":  # T5's relative position bias: one column per head
            current[heads] += along.view(-1, self.full.groups).sum(-1)
            return
        per_channel = along.view(-1, self.full.head_dim)  # [heads or key/value heads, head_dim]
        per_unit = per_channel.sum(-1)
        if per_unit.numel() != self.full.units:  # query heads of a group count for the group
            per_unit = per_unit.view(-1, self.full.groups).sum(-1)
        current[heads] += per_unit
        if self.narrow:
            current[self._key("qk" if role in ("q", "k") else "vo", attention, *where)] += per_channel.sum(0)

    def update(self, step: int) -> None:
        """Tightens the masks to the schedule's counts for the optimizer step just taken (never loosens)."""
        if not self.scoring(step):
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

    def plan(self) -> SlicePlan:
        return plan_from_masks(self.model.config, self.masks)


@torch.no_grad()  # DeepSpeed's fp32 master weights require grad: a product with them would keep its graph
def local_sensitivity(parameter: torch.nn.Parameter) -> torch.Tensor:
    """|w * dL/dw| of a ZeRO-1/2 student weight over the part of it this rank's optimizer holds (its fp32 master
    weights and reduced gradient), zero elsewhere: the ranks' parts add up to the whole weight, so scoring needs
    no gathering. Call between the step's last backward and `engine.step()`."""
    sensitivity = torch.zeros(parameter.numel(), dtype=torch.float32, device=parameter.device)
    mapping = getattr(parameter, "_hp_mapping", None)
    if mapping is None:
        return sensitivity.view_as(parameter)  # no part of this weight in this rank's partition
    address = mapping.lp_fragment_address
    grad = mapping.get_lp_grad_fragment(parameter._index_in_param_group).float().flatten()
    if grad.numel() == parameter.numel():  # a full accumulation buffer on every rank: this rank's part of it
        grad = grad.narrow(0, address.start, address.numel)
    weight = mapping.get_hp_fragment().float().flatten()
    sensitivity.narrow(0, address.start, address.numel).copy_((weight * grad).abs())
    return sensitivity.view_as(parameter)


def plan_from_masks(full: PretrainedConfig, masks: dict) -> SlicePlan:
    """What the masks keep, as a plan that cuts the dense target model from the full student's weights.
    `masks` as a `Pruner` holds them, or as its `state_dict` stored them."""
    stored = {key: mask for key, mask in masks.items() if isinstance(key, str) and key.startswith("mask ")}
    if stored:
        masks = {ast.literal_eval(key.removeprefix("mask ")): mask for key, mask in stored.items()}
    adapter, shape = models.adapter_for(full), shape_of(full)
    layers = {stack: list(range(depth)) for stack, depth in shape.depths.items()}
    plan = SlicePlan(layers, _indices(masks[HIDDEN]))
    for stack, depth in shape.depths.items():
        for block in range(depth):
            plan.ffn[(stack, block)] = _indices(masks[("ffn", stack, block)])
            for attention in shape.attentions(stack):
                key = partial(head_key, attention=attention, stack=stack, block=block, layout=adapter.widths)
                cut = AttentionCut(_indices(masks[key("heads")]), shape.groups, shape.head_dim)
                for kind in ("qk", "vo"):
                    if key(kind) in masks:
                        setattr(cut, kind, dict.fromkeys(cut.heads, _indices(masks[key(kind)])))
                plan.attention[(attention, stack, block)] = cut
    return plan


def _indices(mask: torch.Tensor) -> list[int]:
    return mask.nonzero().flatten().tolist()


def check(
    prune: PruneConfig,
    student_ds: dict,
    teacher: PretrainedConfig,
    student: PretrainedConfig,
    starts_from_teacher: bool,
) -> None:
    """Refuses what pruning cannot do, before any weights load."""
    from ds_distill.config.deepspeed import zero_stage
    from ds_distill.surgery.cut import check_cut

    if zero_stage(student_ds) == 3:
        raise ConfigError(
            "prune (HomoDistil) scores each rank's part of the weights in its ZeRO-2 optimizer partition, which a "
            "ZeRO-3 student lays out otherwise; use ds_configs/student_zero2.json"
        )
    if prune.steps < 1:
        raise ConfigError("prune.steps must be at least 1: the optimizer step at which the target widths are reached")
    full, widths = shape_of(teacher), shape_of(student)
    same_width = (widths.width, widths.ffn, widths.heads, widths.head_dim) == (
        full.width, full.ffn, full.heads, full.head_dim
    )  # fmt: skip
    if not (starts_from_teacher and same_width):
        raise ConfigError(
            "HomoDistil prunes a student that starts as the teacher: set student.init.from_teacher.strategy: sliced "
            "with no width settings (encoder_layers / decoder_layers may cut depth), and the target widths under prune:"
        )
    check_cut(student, target_config(student, prune))
