"""Students cut from the teacher's weights: chosen blocks, and chosen hidden channels, heads and FFN neurons.

    ds-distill make_student --teacher=google/flan-t5-xl --output_dir=students/145m \\
        --encoder_layers=12 --decoder_layers=12 --d_model=512 --d_ff=2048 --num_heads=8 [--width=importance --data=run.yaml]

A `SlicePlan` says which teacher block each student block copies (per stack) and which index set each space
keeps (`models/widths.py`: the hidden channels of the whole model, the heads of each stack, the FFN neurons of
each block). The same index set goes through every tensor that reads or writes a space, so a student of the
teacher's own dimensions reproduces the teacher, and one with fewer blocks equals the teacher's chosen blocks.
Widths are chosen leading-first or by importance (`importance.py`). The teacher is read one tensor at a time
from its safetensors files, so slicing needs memory for the student and one teacher tensor, not the teacher.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

import torch
from transformers import PretrainedConfig

from ds_distill import models, run_dir
from ds_distill.config import LAYER_CHOICES, FromTeacherConfig
from ds_distill.errors import ConfigError


def choose_layers(choice: str, teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher blocks (0-based) a student of `student_layers` blocks copies.

    alternate: every k-th block ending with the last (k = teacher / student; the blocks the `uniform` layer map
    pairs the student's with); uniform: evenly spread from the first to the last; first / last: a run of blocks.
    """
    if student_layers > teacher_layers:
        raise ConfigError(f"a student of {student_layers} blocks cannot be cut from a teacher of {teacher_layers}")
    if choice == "first":
        return list(range(student_layers))
    if choice == "last":
        return list(range(teacher_layers - student_layers, teacher_layers))
    if choice == "alternate":
        return [round((i + 1) * teacher_layers / student_layers) - 1 for i in range(student_layers)]
    if choice == "uniform":
        if student_layers == 1:
            return [teacher_layers - 1]
        return [round(i * (teacher_layers - 1) / (student_layers - 1)) for i in range(student_layers)]
    raise ConfigError(f"layers '{choice}' is unknown; choose one of {', '.join(LAYER_CHOICES)} or list the blocks")


@dataclass
class SlicePlan:
    """What a student keeps of its teacher. Index lists are teacher indices in ascending order."""

    layers: dict[str, list[int]]  # stack -> the teacher block of each student block
    hidden: list[int]
    heads: dict[tuple[str, str], list[int]] = field(default_factory=dict)  # (head space, stack) -> head indices
    # (head space, stack) -> {head: kept channels within it}; all of a head's channels unless heads narrow
    head_channels: dict[tuple[str, str], dict[int, list[int]]] = field(default_factory=dict)
    ffn: dict[tuple[str, int], list[int]] = field(default_factory=dict)  # (stack, teacher block) -> neurons
    head_dim: int = 0

    def attention_indices(self, space: str, stack: str) -> list[int]:
        """The kept rows (or columns) of an attention projection: each kept head's kept channels."""
        channels = self.head_channels.get((space, stack), {})
        full = list(range(self.head_dim))
        return [head * self.head_dim + c for head in self.heads[(space, stack)] for c in channels.get(head, full)]

    def summary(self) -> str:
        lines = [f"  {stack} blocks from teacher blocks {blocks}" for stack, blocks in self.layers.items()]
        lines.append(f"  hidden channels: {len(self.hidden)} ({_span(self.hidden)})")
        for (space, stack), heads in sorted(self.heads.items()):
            channels = self.head_channels.get((space, stack))
            width = f", {len(next(iter(channels.values())))} of {self.head_dim} channels each" if channels else ""
            lines.append(f"  {stack} {space.replace('_', ' ')}: {heads}{width}")
        for stack, blocks in self.layers.items():
            sizes = sorted({len(self.ffn[(stack, block)]) for block in blocks})
            lines.append(f"  {stack} FFN neurons per block: {', '.join(map(str, sizes))}")
        return "\n".join(lines)


def _span(indices: list[int]) -> str:
    return "the leading ones" if indices == list(range(len(indices))) else f"{indices[:6]}..."


def head_dim(adapter: models.ModelAdapter, config: PretrainedConfig) -> int:
    return adapter.attention_widths(config)[0] // adapter.num_heads(config)


def kv_groups(config: PretrainedConfig) -> int:
    """Query heads per key/value head (1 without grouped-query attention)."""
    key_value_heads = getattr(config, "num_key_value_heads", None)
    return config.num_attention_heads // key_value_heads if key_value_heads else 1


def make_plan(
    teacher: PretrainedConfig,
    student: PretrainedConfig,
    layers: dict[str, list[int]],
    scores: dict | None = None,
) -> SlicePlan:
    """Keeps the leading channels, heads and neurons, or with `scores` (`importance.py`) the highest-scoring.

    `scores`: {"hidden": [d_model], ("heads", stack): [heads], ("cross_heads", stack): [heads],
    ("ffn", stack, teacher block): [d_ff]}.
    """
    adapter = models.adapter_for(teacher)
    width, student_width = head_dim(adapter, teacher), head_dim(adapter, student)
    if student_width != width and not (adapter.narrow_heads and student_width < width):
        raise ConfigError(
            f"width slicing keeps every {adapter.name} head whole ({width} wide), but the student's heads would "
            f"be {student_width} wide; pick d_model = num_heads x {width}"
        )
    depths = adapter.depths(student)
    for stack, blocks in layers.items():
        if len(blocks) != depths[stack]:
            raise ConfigError(f"{stack}: {len(blocks)} teacher blocks chosen for a student of {depths[stack]}")
        if any(not 0 <= block < adapter.depths(teacher)[stack] for block in blocks):
            raise ConfigError(
                f"{stack}: teacher blocks {blocks} out of range (it has {adapter.depths(teacher)[stack]})"
            )

    def choose(count: int, total: int, what: str, ranking=None) -> list[int]:
        if count > total:
            raise ConfigError(f"the student's {what} ({count}) exceed the teacher's ({total})")
        if ranking is None:
            return list(range(count))
        return sorted(torch.as_tensor(ranking, dtype=torch.float64).topk(count).indices.tolist())

    scores = scores or {}
    plan = SlicePlan(
        layers,
        choose(adapter.width(student), adapter.width(teacher), "hidden channels", scores.get("hidden")),
        head_dim=width,
    )
    groups = kv_groups(teacher)
    for stack in layers:
        spaces = ("heads", "cross_heads") if adapter.kind == "seq2seq" and stack == "decoder" else ("heads",)
        for space in spaces:
            student_heads, teacher_heads = adapter.num_heads(student), adapter.num_heads(teacher)
            ranking = scores.get((space, stack))
            if groups > 1:  # whole groups: a key/value head with every query head that reads it
                ranking = None if ranking is None else torch.as_tensor(ranking).view(-1, groups).sum(-1)
                kept = choose(student_heads // groups, teacher_heads // groups, f"{stack} key/value heads", ranking)
                plan.heads[("kv_heads", stack)] = kept
                plan.heads[(space, stack)] = [group * groups + i for group in kept for i in range(groups)]
            else:
                plan.heads[(space, stack)] = choose(student_heads, teacher_heads, f"{stack} heads", ranking)
            if student_width < width:  # narrower heads: each keeps its highest-scoring (or leading) channels
                ranking = scores.get((space, stack, "channels"))
                plan.head_channels[(space, stack)] = {
                    head: choose(
                        student_width, width, f"{stack} channels per head",
                        None if ranking is None else torch.as_tensor(ranking).view(-1, width)[head],
                    )
                    for head in plan.heads[(space, stack)]
                }  # fmt: skip
        student_ffn, teacher_ffn = _ffn_width(adapter, student), _ffn_width(adapter, teacher)
        for block in layers[stack]:
            ranking = scores.get(("ffn", stack, block))
            plan.ffn[(stack, block)] = choose(student_ffn, teacher_ffn, f"{stack} FFN neurons", ranking)
    return plan


def _ffn_width(adapter: models.ModelAdapter, config: PretrainedConfig) -> int:
    value = getattr(config, adapter.config_fields["d_ff"][0])
    if value is None:  # GPT-2's n_inner: None means 4 x n_embd
        value = 4 * adapter.width(config)
    return value


# -- reading the teacher one tensor at a time --------------------------------------------------------------


class StateReader:
    """Tensors of a state dict in memory, read like a checkpoint (HomoDistil slices its trained student)."""

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


def _block_name(adapter: models.ModelAdapter, name: str) -> tuple[str, int, str] | None:
    """(stack, block, name with the block number replaced by N) for a tensor inside a block, else None."""
    for stack, layout in adapter.layout.items():
        match = re.match(rf"^(.*?){re.escape(layout.blocks)}\.(\d+)\.(.*)$", name)
        if match and (not match.group(1) or match.group(1).endswith(".")):
            return stack, int(match.group(2)), f"{match.group(1)}{layout.blocks}.N.{match.group(3)}"
    return None


def slice_teacher(teacher_path, teacher: PretrainedConfig, student: PretrainedConfig, plan: SlicePlan):
    """The student's state dict (every name, tied ones included) cut from the teacher's checkpoint (a path or
    hub id) or state dict."""
    adapter = models.adapter_for(teacher)
    reader = StateReader(teacher_path) if isinstance(teacher_path, dict) else CheckpointReader(teacher_path)
    # a checkpoint stores tied tensors once: under any name of a tied group, or the tied source's
    tied_in_teacher = dict(getattr(adapter.model_class(teacher, set(reader.files)), "_tied_weights_keys", None) or {})
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
        normalized = _block_name(adapter, source)[2] if block else source
        spaces = adapter.widths.spaces(normalized)
        if spaces is None:
            raise ConfigError(f"no slicing rule for {normalized} in models/widths.py ({adapter.name})")
        tensor = reader.get(source)
        for axis, space in enumerate(spaces):
            if space is not None:
                index = torch.tensor(_indices(plan, space, *(block or (None, None)), teacher))
                tensor = tensor.index_select(axis, index)
        if plan.head_channels and any(fnmatchcase(normalized, pattern) for pattern in adapter.widths.queries):
            tensor = _fold_query_scale(tensor, spaces, plan, block[0])
        tensor = tensor.contiguous()
        for name in names:
            state[name] = tensor
    return state


def _fold_query_scale(tensor: torch.Tensor, spaces, plan: SlicePlan, stack: str) -> torch.Tensor:
    """Narrower heads divide their scores by sqrt(the narrower width): scaling the queries by sqrt(narrow /
    full) keeps the scores the kept channels give, so the student attends as the masked teacher does."""
    channels = len(next(iter(plan.head_channels[("heads", stack)].values())))
    scale = (channels / plan.head_dim) ** 0.5
    axis = next(i for i, space in enumerate(spaces) if space in ("heads", "cross_heads", "qkv_heads"))
    tensor = tensor.clone()
    if spaces[axis] == "qkv_heads":  # only the query third of [q | k | v]
        tensor.narrow(axis, 0, tensor.shape[axis] // 3).mul_(scale)
    else:
        tensor.mul_(scale)
    return tensor


def _source(adapter: models.ModelAdapter, name: str, plan: SlicePlan) -> tuple[str, tuple[str, int] | None]:
    """The teacher tensor a student tensor is cut from, and its (stack, teacher block) if inside a block."""
    block = _block_name(adapter, name)
    if block is None:
        return name, None
    stack, student_block, normalized = block
    teacher_block = plan.layers[stack][student_block]
    if name.endswith("relative_attention_bias.weight"):
        teacher_block = 0  # T5 keeps its relative position bias in block 0 only, shared by all blocks
    return normalized.replace(".N.", f".{teacher_block}.", 1), (stack, teacher_block)


def _indices(plan: SlicePlan, space: str, stack: str | None, block: int | None, teacher: PretrainedConfig):
    if space == "hidden":
        return plan.hidden
    if space == "ffn":
        return plan.ffn[(stack, block)]
    if space == "head":
        return plan.heads[("heads", stack)]
    if space == "qkv_heads":  # [q | k | v], each a teacher width wide
        width = models.adapter_for(teacher).attention_widths(teacher)[0]
        return [third * width + index for third in range(3) for index in plan.attention_indices("heads", stack)]
    return plan.attention_indices(space, stack)


def save_student(state: dict, student: PretrainedConfig, output_dir: Path, tokenizer_source: str, provenance: dict):
    """Writes a Hugging Face directory (config, safetensors, tokenizer, generation config) that from_pretrained
    loads, whole or not at all."""
    import shutil

    from transformers import AutoTokenizer, GenerationConfig

    adapter = models.adapter_for(student)
    with torch.device("meta"):
        model = adapter.from_config(student)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise ConfigError(f"sliced tensors the student has no place for: {unexpected[:5]}")
    model.tie_weights()
    still_meta = [name for name, tensor in model.state_dict().items() if tensor.is_meta]
    if still_meta:
        raise ConfigError(f"the student's {', '.join(still_meta[:5])} were not filled from the teacher")
    staging = output_dir.with_name(output_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(staging)
    try:
        GenerationConfig.from_pretrained(tokenizer_source).save_pretrained(staging)
    except OSError:  # the teacher ships no generation config
        pass
    (staging / run_dir.STUDENT_MARKER).write_text(json.dumps(provenance, indent=2) + "\n")
    if output_dir.exists():
        shutil.rmtree(output_dir)
    staging.rename(output_dir)


# -- the whole job: `ds-distill make_student` and `student.init.from_teacher.strategy: sliced` -----------------


def teacher_layers(
    dims: FromTeacherConfig, teacher: PretrainedConfig, student: PretrainedConfig
) -> dict[str, list[int]]:
    """The teacher block each student block copies, per stack: explicit lists, else `dims.layers`."""
    adapter = models.adapter_for(teacher)
    teacher_depths, student_depths = adapter.depths(teacher), adapter.depths(student)
    explicit = {"encoder": dims.encoder_layers_from, "decoder": dims.decoder_layers_from}
    return {
        stack: list(explicit[stack])
        if explicit.get(stack)
        else choose_layers(dims.layers, teacher_depths[stack], depth)
        for stack, depth in student_depths.items()
    }


def make_student(
    teacher: str, output_dir: Path, dims: FromTeacherConfig, calibration: Callable | None = None
) -> tuple[PretrainedConfig, SlicePlan]:
    """Cuts a student of `dims` from `teacher` (a hub id or directory) into `output_dir`.

    `calibration(model) -> batches`: the batches whose activations rank channels, heads and neurons
    (`dims.width == "importance"`; the teacher is then loaded whole, once).
    """
    from ds_distill.importance import activation_scores

    teacher_config = models.load_config(teacher, "teacher")
    adapter = models.adapter_for(teacher_config)
    student_config = adapter.shrink(teacher_config, dims)
    layers = teacher_layers(dims, teacher_config, student_config)
    scores = None
    if dims.width == "importance":
        if calibration is None:
            raise ConfigError("width importance ranks by activations on calibration data: give --data=RUN.yaml")
        model = adapter.from_pretrained(teacher, "teacher", dtype=torch.float32)
        scores = activation_scores(model, calibration(model))
        del model
    plan = make_plan(teacher_config, student_config, layers, scores)
    state = slice_teacher(teacher, teacher_config, student_config, plan)
    provenance = {"teacher": teacher, "width": dims.width, "layers": layers, "dimensions": vars(dims)}
    save_student(state, student_config, output_dir, teacher, provenance)
    return student_config, plan


def first_batches(dataset, collate, batch_size: int, count: int) -> list[dict[str, torch.Tensor]]:
    """The first `count` batches of a tokenized split, in order (calibration data)."""
    rows = min(len(dataset), batch_size * count)
    return [
        collate([dataset[i] for i in range(start, min(start + batch_size, rows))])
        for start in range(0, rows, batch_size)
    ]


def parse_count(value) -> int:
    """145M, 1.2B, 250k or a plain number -> parameters."""
    text = str(value).strip().upper()
    scale = {"K": 1e3, "M": 1e6, "B": 1e9}.get(text[-1:], 1)
    try:
        return int(float(text[:-1] if scale != 1 else text) * scale)
    except ValueError:
        raise ConfigError(f"target_params '{value}' is not a count such as 145M, 1.2B or 250000") from None


def propose_dims(teacher: PretrainedConfig, target: int, count: int = 3) -> list[tuple[FromTeacherConfig, int]]:
    """Student dimensions near `target` parameters (counted on the meta device), closest first: the teacher's
    depth or a half, third or quarter of it, d_model a whole number of the teacher's d_model / heads, d_ff in
    the teacher's ratio to d_model (a multiple of 64)."""
    adapter = models.adapter_for(teacher)
    width, ffn, heads = adapter.width(teacher), _ffn_width(adapter, teacher), adapter.num_heads(teacher)
    depths = adapter.depths(teacher)
    candidates = []
    for divisor in (1, 2, 3, 4):
        if any(depth % divisor for depth in depths.values()):
            continue
        layers = {f"{stack}_layers": depth // divisor for stack, depth in depths.items()}

        def dims_for(student_heads: int, layers=layers) -> FromTeacherConfig:
            d_model = student_heads * width // heads
            d_ff = min(ffn, max(64, round(ffn * d_model / width / 64) * 64))
            return FromTeacherConfig(**layers, d_model=d_model, d_ff=d_ff, num_heads=student_heads)

        low, high = 1, heads  # the count grows with the heads: find the first at or above the target
        while low < high:
            middle = (low + high) // 2
            if models.count_parameters(adapter.shrink(teacher, dims_for(middle))) < target:
                low = middle + 1
            else:
                high = middle
        for student_heads in {max(1, low - 1), low}:
            dims = dims_for(student_heads)
            candidates.append((dims, models.count_parameters(adapter.shrink(teacher, dims))))
    return sorted(candidates, key=lambda candidate: abs(candidate[1] - target))[:count]
