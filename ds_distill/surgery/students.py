"""Students cut from the teacher's weights: `ds-distill make_student` and `student.init.from_teacher.strategy: sliced`.

    ds-distill make_student --teacher=google/flan-t5-xl --output_dir=students/145m \\
        --encoder_layers=12 --decoder_layers=12 --d_model=512 --d_ff=2048 --num_heads=8 [--width=importance --data=run.yaml]

The teacher is read one tensor at a time from its safetensors files, so cutting needs memory for the student
and one teacher tensor, not the teacher. Ranking by importance needs the teacher's activations on calibration
batches: a seeded sample drawn across the training split (NVIDIA's Minitron uses 512-1024 samples).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PretrainedConfig

from ds_distill import models
from ds_distill.config import run_dir
from ds_distill.config.run import FromTeacherConfig
from ds_distill.errors import ConfigError
from ds_distill.surgery.cut import SlicePlan, check_cut, choose_layers, cut_state, make_plan
from ds_distill.surgery.shapes import shape_of


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


def calibration_rows(rows: int, batch_size: int, batches: int, seed: int) -> list[list[int]]:
    """Row indices of `batches` calibration batches drawn without replacement across a split of `rows` rows,
    the same for a given seed (a split's first rows are often one source: Europarl before news)."""
    generator = torch.Generator().manual_seed(seed)
    drawn = torch.randperm(rows, generator=generator)[: batch_size * batches].tolist()
    return [sorted(drawn[start : start + batch_size]) for start in range(0, len(drawn), batch_size)]


def rank_share(batches: list, rank: int, world: int) -> list:
    """This rank's share of the batches; every rank gets as many (a ZeRO-3 forward is collective)."""
    per_rank = max(1, len(batches) // world)
    return [batches[(rank + world * i) % len(batches)] for i in range(per_rank)]


def make_student(
    teacher: str,
    output_dir: Path,
    dims: FromTeacherConfig,
    calibration: Callable | None = None,
    scores: dict | None = None,
) -> tuple[PretrainedConfig, SlicePlan]:
    """Cuts a student of `dims` from `teacher` (a hub id or directory) into `output_dir`.

    With `dims.width == "importance"`: `scores` (`importance.activation_scores`, e.g. summed over ranks), or
    `calibration(model) -> batches`, for which the teacher is loaded whole, once.
    """
    from ds_distill.surgery.importance import activation_scores

    teacher_config = models.load_config(teacher, "teacher")
    adapter = models.adapter_for(teacher_config)
    student_config = adapter.shrink(teacher_config, dims)
    check_cut(teacher_config, student_config)
    layers = teacher_layers(dims, teacher_config, student_config)
    if dims.width == "importance" and scores is None:
        if calibration is None:
            raise ConfigError("width importance ranks by activations on calibration data: give --data=RUN.yaml")
        model = adapter.from_pretrained(teacher, "teacher", dtype=torch.float32)
        scores = activation_scores(model, calibration(model))
        del model
    plan = make_plan(teacher_config, student_config, layers, scores if dims.width == "importance" else None)
    state = cut_state(teacher, teacher_config, student_config, plan)
    provenance = {"teacher": teacher, "width": dims.width, "layers": layers, "dimensions": vars(dims)}
    save_student(state, student_config, output_dir, teacher, provenance)
    return student_config, plan


def save_student(state: dict, student: PretrainedConfig, output_dir: Path, tokenizer_source: str, provenance: dict):
    """Writes a Hugging Face directory (config, safetensors, tokenizer, generation config) that from_pretrained
    loads, whole or not at all."""
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
    with models.quiet_saving():
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


def parse_count(value) -> int:
    """145M, 1.2B, 250k or a plain number -> parameters."""
    text = str(value).strip().upper()
    scale = {"K": 1e3, "M": 1e6, "B": 1e9}.get(text[-1:], 1)
    try:
        return int(float(text[:-1] if scale != 1 else text) * scale)
    except ValueError:
        raise ConfigError(f"target_params '{value}' is not a count such as 145M, 1.2B or 250000") from None


def propose_dims(teacher: PretrainedConfig, target: int, count: int = 3) -> list[tuple[FromTeacherConfig, int]]:
    """Student dimensions near `target` parameters (counted on the meta device), closest first, that a cut can
    make: the teacher's depth or a half, third or quarter of it; whole key/value groups of whole heads (or
    d_model / num_heads as the teacher's where the head width is its own); d_ff in the teacher's ratio to
    d_model (a multiple of 64)."""
    adapter = models.adapter_for(teacher)
    shape = shape_of(teacher)
    candidates = []
    for divisor in (1, 2, 3, 4):
        if any(depth % divisor for depth in shape.depths.values()):
            continue
        layers = {f"{stack}_layers": depth // divisor for stack, depth in shape.depths.items()}

        def dims_for(units: int, layers=layers) -> FromTeacherConfig:
            heads = units * shape.groups
            d_model = heads * shape.width // shape.heads
            d_ff = min(shape.ffn, max(64, round(shape.ffn * d_model / shape.width / 64) * 64))
            return FromTeacherConfig(**layers, d_model=d_model, d_ff=d_ff, num_heads=heads)

        def size(units: int) -> int:
            return models.count_parameters(adapter.shrink(teacher, dims_for(units)))

        low, high = 1, shape.units  # the count grows with the heads: find the first at or above the target
        while low < high:
            middle = (low + high) // 2
            if size(middle) < target:
                low = middle + 1
            else:
                high = middle
        for units in {max(1, low - 1), low}:
            dims = dims_for(units)
            student = adapter.shrink(teacher, dims)
            check_cut(teacher, student)
            candidates.append((dims, models.count_parameters(student)))
    return sorted(candidates, key=lambda candidate: abs(candidate[1] - target))[:count]


def calibration_batches(config: str, teacher: str, count: int):
    """Calibration batches from a YAML's data section: a seeded sample of the training split, tokenized with
    the teacher's tokenizer (only the sampled rows)."""
    import datasets

    from ds_distill.config.load import read_tree
    from ds_distill.config.run import DataConfig, TrainConfig
    from ds_distill.config.typed import from_dict
    from ds_distill.data import batches, tokenizers
    from ds_distill.data import tokenized as data

    tree = read_tree(Path(config))
    if "data" not in tree:
        raise ConfigError(f"--data={config} has no data: section to draw calibration batches from")
    data_config = from_dict(DataConfig, tree["data"], "data")
    train = {k: v for k, v in tree.get("train", {}).items() if k in ("per_device_train_batch_size", "seed")}
    train = from_dict(TrainConfig, train, "train")
    size, seed = train.per_device_train_batch_size, train.seed
    tokenizer = tokenizers.load_tokenizer(teacher)
    raw = data.load_raw(data_config)[data_config.train_split]
    rows = calibration_rows(len(raw), size, count, seed)
    sample = raw.select([i for batch in rows for i in batch])
    split = data.tokenize(data_config, tokenizer, datasets.DatasetDict({data_config.train_split: sample}))
    split = split[data_config.train_split]

    def calibration(model):
        collate = batches.make_collator(data_config, tokenizer, model)
        return [
            collate([split[i] for i in range(start, min(start + size, len(split)))])
            for start in range(0, len(split), size)
        ]

    return calibration
