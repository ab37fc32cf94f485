"""What a student keeps of its teacher (a `SlicePlan`), and the student's tensors cut from the teacher's.

A plan says which teacher block each student block copies (per stack) and which units each space of
`models/spaces.py` keeps: the hidden channels of the whole model, the FFN neurons of each block, and for each
attention of each block its key/value groups and, where heads narrow, each head's query/key and value/output
channels. The same index set goes through every tensor that reads or writes a space, so a student of the
teacher's own dimensions reproduces the teacher, one with fewer blocks equals the teacher's chosen blocks, and
a narrower one computes what the teacher computes on the kept units (width-dependent scales folded in).
Units are the leading ones, or the highest-scoring (`importance.py`, or HomoDistil's masks in `prune.py`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from transformers import PretrainedConfig

from ds_distill import models
from ds_distill.config.run import LAYER_CHOICES
from ds_distill.errors import ConfigError
from ds_distill.models.spaces import attention_role, head_key
from ds_distill.objectives import layer_map
from ds_distill.surgery.shapes import Shape, shape_of


def choose_layers(choice: str, teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher blocks (0-based) a student of `student_layers` blocks copies.

    alternate: the blocks the `uniform` layer map pairs the student's with (one rounding rule for both, so a
    cut student's block i starts as the teacher block its layer-wise losses compare it with); uniform: evenly
    spread from the first to the last; first / last: a run of blocks.
    """
    if student_layers > teacher_layers:
        raise ConfigError(f"a student of {student_layers} blocks cannot be cut from a teacher of {teacher_layers}")
    if choice == "first":
        return list(range(student_layers))
    if choice == "last":
        return list(range(teacher_layers - student_layers, teacher_layers))
    if choice == "alternate":
        return [teacher - 1 for _, teacher in layer_map.uniform(student_layers, teacher_layers)]
    if choice == "uniform":
        if student_layers == 1:
            return [teacher_layers - 1]
        return [round(i * (teacher_layers - 1) / (student_layers - 1)) for i in range(student_layers)]
    raise ConfigError(f"layers '{choice}' is unknown; choose one of {', '.join(LAYER_CHOICES)} or list the blocks")


@dataclass
class AttentionCut:
    """What one attention keeps: key/value groups, and per kept query head its query/key and value/output
    channels (None: all of them)."""

    units: list[int]
    groups: int
    head_dim: int
    qk: dict[int, list[int]] | None = None
    vo: dict[int, list[int]] | None = None

    @property
    def heads(self) -> list[int]:
        return [unit * self.groups + i for unit in self.units for i in range(self.groups)]

    @property
    def student_head_dim(self) -> int:
        return len(next(iter(self.qk.values()))) if self.qk else self.head_dim

    def _channels(self, heads: list[int], per_head: dict[int, list[int]] | None) -> list[int]:
        full = list(range(self.head_dim))
        return [h * self.head_dim + c for h in heads for c in (per_head[h] if per_head else full)]

    def rows(self, role: str, teacher_width: int) -> list[int]:
        """Kept indices along a projection's head axis; `teacher_width`: heads x head_dim (for [q | k | v])."""
        if role == "q":
            return self._channels(self.heads, self.qk)
        if role == "k":  # one key/value head per unit; narrowing implies no grouping, so unit = head
            return self._channels(self.units, self.qk)
        if role == "v":
            return self._channels(self.units, self.vo)
        if role == "o":
            return self._channels(self.heads, self.vo)
        if role == "bias":
            return self.heads
        if role == "qkv":
            return [third * teacher_width + i for third, role in enumerate("qkv") for i in self.rows(role, 0)]
        raise ValueError(role)


@dataclass
class SlicePlan:
    """What a student keeps of its teacher. Index lists are teacher indices in ascending order; blocks are
    teacher blocks."""

    layers: dict[str, list[int]]  # stack -> the teacher block of each student block
    hidden: list[int]
    ffn: dict[tuple[str, int], list[int]] = field(default_factory=dict)  # (stack, block) -> neurons
    attention: dict[tuple[str, str, int], AttentionCut] = field(default_factory=dict)  # (attention, stack, block)

    def summary(self) -> str:
        lines = [f"  {stack} blocks from teacher blocks {blocks}" for stack, blocks in self.layers.items()]
        lines.append(f"  hidden channels: {len(self.hidden)} ({_span(self.hidden)})")
        for stack, blocks in self.layers.items():
            for attention in ("self", "cross"):
                cuts = [
                    self.attention[(attention, stack, b)] for b in blocks if (attention, stack, b) in self.attention
                ]
                if not cuts:
                    continue
                heads = [cut.heads for cut in cuts]
                shown = str(heads[0]) if all(h == heads[0] for h in heads) else " ".join(map(str, heads))
                narrow = cuts[0].student_head_dim
                width = f", {narrow} of {cuts[0].head_dim} channels each" if narrow < cuts[0].head_dim else ""
                lines.append(f"  {stack} {attention}-attention heads per block: {shown}{width}")
            sizes = sorted({len(self.ffn[(stack, block)]) for block in blocks})
            lines.append(f"  {stack} FFN neurons per block: {', '.join(map(str, sizes))}")
        return "\n".join(lines)


def _span(indices: list[int]) -> str:
    return "the leading ones" if indices == list(range(len(indices))) else f"{indices[:6]}..."


def _top(count: int, total: int, what: str, ranking=None) -> list[int]:
    if count > total:
        raise ConfigError(f"the student's {what} ({count}) exceed the teacher's ({total})")
    if ranking is None:
        return list(range(count))
    return sorted(torch.as_tensor(ranking, dtype=torch.float64).topk(count).indices.tolist())


def check_cut(teacher: PretrainedConfig, student: PretrainedConfig) -> None:
    """Refuses, before any tensor is read, a student whose heads a cut cannot make from the teacher's."""
    adapter = models.adapter_for(teacher)
    full, small = shape_of(teacher), shape_of(student)
    if small.head_dim != full.head_dim and not (adapter.narrow_heads and small.head_dim < full.head_dim):
        raise ConfigError(
            f"a cut keeps every {adapter.name} head whole ({full.head_dim} channels), but the student's heads would "
            f"be {small.head_dim} wide; pick d_model = num_heads x {full.head_dim}"
        )
    if small.groups != full.groups or small.heads % full.groups:
        raise ConfigError(
            f"a cut keeps whole key/value groups ({full.groups} query heads share each of the teacher's "
            f"{full.units} key/value heads): num_heads must be a multiple of {full.groups}, not {small.heads}"
        )
    if small.heads > full.heads:
        raise ConfigError(f"the student's heads ({small.heads}) exceed the teacher's ({full.heads})")


def make_plan(
    teacher: PretrainedConfig,
    student: PretrainedConfig,
    layers: dict[str, list[int]],
    scores: dict | None = None,
) -> SlicePlan:
    """Keeps the leading units, or with `scores` the highest-scoring, of each space.

    `scores`, keyed as in `models/spaces.py`: ("hidden",): [d_model]; ("ffn", stack, block): [d_ff];
    ("heads", attention, stack, block): [key/value groups] (block None where heads are per stack);
    ("qk" | "vo", attention, stack, block): [heads, head_dim].
    """
    check_cut(teacher, student)
    adapter = models.adapter_for(teacher)
    full, small = shape_of(teacher), shape_of(student)
    for stack, blocks in layers.items():
        if len(blocks) != small.depths[stack]:
            raise ConfigError(f"{stack}: {len(blocks)} teacher blocks chosen for a student of {small.depths[stack]}")
        if any(not 0 <= block < full.depths[stack] for block in blocks):
            raise ConfigError(f"{stack}: teacher blocks {blocks} out of range (it has {full.depths[stack]})")
    scores = scores or {}
    plan = SlicePlan(layers, _top(small.width, full.width, "hidden channels", scores.get(("hidden",))))
    for stack, blocks in layers.items():
        for block in blocks:
            ranking = scores.get(("ffn", stack, block))
            plan.ffn[(stack, block)] = _top(small.ffn, full.ffn, f"{stack} FFN neurons", ranking)
            for attention in full.attentions(stack):
                key = partial(head_key, attention=attention, stack=stack, block=block, layout=adapter.widths)
                plan.attention[(attention, stack, block)] = _attention_cut(full, small, scores, key)
    return plan


def _attention_cut(full: Shape, small: Shape, scores: dict, key) -> AttentionCut:
    cut = AttentionCut(
        _top(small.units, full.units, "key/value groups", scores.get(key("heads"))), full.groups, full.head_dim
    )
    if small.head_dim < full.head_dim:  # narrower heads: each keeps its highest-scoring (or leading) channels
        for kind in ("qk", "vo"):
            ranking = scores.get(key(kind))
            setattr(cut, kind, {
                head: _top(small.head_dim, full.head_dim, "channels per head", None if ranking is None else ranking[head])
                for head in cut.heads
            })  # fmt: skip
    return cut


# -- reading the teacher one tensor at a time --------------------------------------------------------------


class StateReader:
    """Tensors of a state dict in memory, read like a checkpoint (HomoDistil cuts its trained student)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state, self.files = state, dict.fromkeys(state)

    def __contains__(self, name: str) -> bool:
        return name in self.state

    def get(self, name: str) -> torch.Tensor:
        return self.state[name]


class CheckpointReader:
    """Tensors of a Hugging Face checkpoint (safetensors, sharded or not), read one at a time by name."""

    def __init__(self, name_or_path: str):
        from safetensors import safe_open
        from transformers.utils import cached_file

        def fetch(filename: str) -> str | None:
            return cached_file(name_or_path, filename, _raise_exceptions_for_missing_entries=False)

        index = fetch("model.safetensors.index.json")
        if index:
            weight_map = json.loads(Path(index).read_text())["weight_map"]
            files = {name: fetch(filename) for name, filename in weight_map.items()}
        else:
            single = fetch("model.safetensors")
            if single is None:
                raise ConfigError(
                    f"{name_or_path} has no safetensors weights (model.safetensors); slicing reads those. Convert "
                    "it once: load it with from_pretrained and save_pretrained it"
                )
            with safe_open(single, "pt") as handle:
                files = dict.fromkeys(handle.keys(), single)
        self.files = files
        self.handles = {path: safe_open(path, "pt") for path in set(files.values())}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        return self.handles[self.files[name]].get_tensor(name)


def block_name(adapter: models.ModelAdapter, name: str) -> tuple[str, int, str] | None:
    """(stack, block, name with the block number replaced by N) for a tensor inside a block, else None."""
    for stack, layout in adapter.layout.items():
        match = re.match(rf"^(.*?){re.escape(layout.blocks)}\.(\d+)\.(.*)$", name)
        if match and (not match.group(1) or match.group(1).endswith(".")):
            return stack, int(match.group(2)), f"{match.group(1)}{layout.blocks}.N.{match.group(3)}"
    return None


def cut_state(teacher_path, teacher: PretrainedConfig, student: PretrainedConfig, plan: SlicePlan):
    """The student's state dict (every name, tied ones included) cut from the teacher's checkpoint (a path or
    hub id) or state dict."""
    adapter = models.adapter_for(teacher)
    full = shape_of(teacher)
    reader = StateReader(teacher_path) if isinstance(teacher_path, dict) else CheckpointReader(teacher_path)
    # a checkpoint stores tied tensors once: under any name of a tied group, or the tied source's
    teacher_class = adapter.model_class(teacher, set(reader.files))
    if hasattr(teacher_class, "_model_mapping"):  # an Auto class: the concrete class knows the tied names
        teacher_class = teacher_class._model_mapping[type(teacher)]
    tied_in_teacher = dict(getattr(teacher_class, "_tied_weights_keys", None) or {})
    with torch.device("meta"):
        groups: dict[int, list[str]] = {}
        for name, tensor in adapter.from_config(student).state_dict(keep_vars=True).items():
            groups.setdefault(id(tensor), []).append(name)
    state = {}
    for names in groups.values():
        candidates = [_source(adapter, name, plan) for name in names]
        candidates += [(tied_in_teacher[source], block) for source, block in candidates if source in tied_in_teacher]
        found = next(((source, block) for source, block in candidates if source in reader), None)
        if found is None:
            raise ConfigError(f"the teacher's checkpoint has no tensor for the student's {names[0]}")
        source, block = found
        normalized = block_name(adapter, source)[2] if block else source
        spaces = adapter.widths.spaces(normalized)
        if spaces is None:
            raise ConfigError(f"no cutting rule for {normalized} in models/spaces.py ({adapter.name})")
        tensor = reader.get(source)
        for axis, space in enumerate(spaces):
            if space is not None:
                tensor = tensor.index_select(axis, torch.tensor(_indices(plan, space, block, full)))
        tensor = _fold_scales(tensor, spaces, plan, block, full, adapter.widths.scaled(normalized, teacher))
        for name in names:
            state[name] = tensor.contiguous()
    return state


def _fold_scales(tensor, spaces, plan: SlicePlan, block, full: Shape, width_scaled: bool) -> torch.Tensor:
    """Narrower heads divide their scores by sqrt(the narrower width): scaling the queries by sqrt(narrow /
    full) keeps the scores the kept channels give. A width-dependent scale of the model (`models/spaces.py`) is
    undone in the tensor the table names."""
    if width_scaled and len(plan.hidden) != full.width:
        tensor = tensor * (len(plan.hidden) / full.width) ** 0.5
    roles = [attention_role(space) for space in spaces]
    query = next(((axis, role) for axis, role in enumerate(roles) if role and role[1] in ("q", "qkv")), None)
    if query is None:
        return tensor
    axis, (attention, role) = query
    narrow = plan.attention[(attention, *block)].student_head_dim
    if narrow == full.head_dim:
        return tensor
    tensor = tensor.clone()
    scale = (narrow / full.head_dim) ** 0.5
    (tensor.narrow(axis, 0, tensor.shape[axis] // 3) if role == "qkv" else tensor).mul_(scale)
    return tensor


def _source(adapter: models.ModelAdapter, name: str, plan: SlicePlan) -> tuple[str, tuple[str, int] | None]:
    """The teacher tensor a student tensor is cut from, and its (stack, teacher block) if inside a block."""
    block = block_name(adapter, name)
    if block is None:
        return name, None
    stack, student_block, normalized = block
    teacher_block = plan.layers[stack][student_block]
    if adapter.widths.spaces(normalized) and "self.bias" in adapter.widths.spaces(normalized):
        # T5 keeps its relative position bias in block 0 only, shared by all blocks (and one head set per stack)
        return normalized.replace(".N.", ".0.", 1), (stack, teacher_block)
    return normalized.replace(".N.", f".{teacher_block}.", 1), (stack, teacher_block)


def _indices(plan: SlicePlan, space: str, block: tuple[str, int] | None, full: Shape) -> list[int]:
    if space == "hidden":
        return plan.hidden
    if space == "ffn":
        return plan.ffn[block]
    attention, role = attention_role(space)
    return plan.attention[(attention, *block)].rows(role, full.heads * full.head_dim)
