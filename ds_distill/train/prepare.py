"""Everything a run checks before any weights load: config, DeepSpeed JSONs, both models' configs, the tokenizer
and the data; then the output directory is claimed. A mistake found here costs seconds, not a launch."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from datasets import DatasetDict
from transformers import GenerationConfig, PretrainedConfig, PreTrainedTokenizerBase

from ds_distill import dist, models
from ds_distill.config import deepspeed as ds_config
from ds_distill.config import run_dir
from ds_distill.config.losses import OnPolicyOptions
from ds_distill.config.run import RunConfig, cross_tokenizer, to_yaml
from ds_distill.data import batches, tokenizers
from ds_distill.data import tokenized as data
from ds_distill.errors import ConfigError
from ds_distill.objectives.layerwise import ModelPair
from ds_distill.objectives.registry import build_losses
from ds_distill.surgery import prune
from ds_distill.train import checkpoint, drafting, export, teacher_cache
from ds_distill.train.student import student_hf_config


@dataclass
class Prepared:
    """Everything known before weights load."""

    run: RunConfig
    output_dir: Path
    tokenizer: PreTrainedTokenizerBase
    datasets: DatasetDict
    """The tokenized splits (`data.load_tokenized`)."""
    teacher_ds: dict | None
    """The teacher's DeepSpeed config, "auto" values filled; None: no teacher engine (none, or its cache)."""
    student_ds: dict
    student_config: PretrainedConfig
    generation_config: GenerationConfig
    total_steps: int
    validation_split: str | None
    teacher_config: PretrainedConfig | None = None
    teacher_tokenizer: PreTrainedTokenizerBase | None = None
    """Across tokenizers (`losses.kd.cross_tokenizer`): the teacher's own; None where the models share one."""
    resumes: bool = False
    """Whether the run goes on from a checkpoint in output_dir: decided where the directory is claimed."""


def prepare(run: RunConfig, resume: bool | str = False, overwrite: bool = False, claim: bool = True) -> Prepared:
    """Validates config, DeepSpeed JSON, the models' configs, tokenizer and data, then claims output_dir
    (`claim_output_dir`; `claim=False` leaves that to the caller: `prepare_students`, or a job that writes
    elsewhere).

    Nothing in output_dir is touched (not even by --overwrite) until every check has passed.
    """
    train = run.train
    if claim:  # the home directory (`~`) is never a run's directory: said before any data is read
        run_dir.refuse_home(Path(train.output_dir), "train.output_dir")
    teacher_json = ds_config.load_json(run.teacher.deepspeed_config) if run.teacher.model_name_or_path else None
    student_json = ds_config.load_json(run.student.deepspeed_config)
    if teacher_json is not None and "optimizer" in teacher_json:
        raise ConfigError(f"{run.teacher.deepspeed_config}: the teacher is frozen; remove its optimizer section")
    teacher_config, student_config = check_models(run)
    tokenizer, teacher_tokenizer = check_tokenizer(run, teacher_config, student_config)

    tokenized = data.load_tokenized(run.data, tokenizer, teacher_tokenizer)
    if run.teacher.cache:  # the teacher's outputs come from disk: no teacher engine
        pair = model_pair(run, student_config, teacher_config)
        teacher_cache.check_run(run, teacher_config, student_config, tokenizer, tokenized[run.data.train_split], pair)
        teacher_json = None
    validation_split = run.data.validation_split if run.data.validation_split in tokenized else None
    if run.data.validation_split and not validation_split:
        dist.print_main(
            f"dataset '{run.data.dataset}' has no split '{run.data.validation_split}': training without evaluation "
            "(data.validation_split_percentage holds out a share of the training split)"
        )
    batches_per_epoch = batches.batches_per_epoch(
        len(tokenized[run.data.train_split]), train.per_device_train_batch_size
    )
    total_steps = train.max_steps
    if total_steps <= 0:
        total_steps = math.ceil(train.num_train_epochs * batches_per_epoch / train.gradient_accumulation_steps)

    from deepspeed.accelerator import get_accelerator

    on_cpu = get_accelerator().device_name() == "cpu"
    world = dist.world_size()
    student_ds = ds_config.fill_auto(student_json, train, world, total_steps, on_cpu, run.student.deepspeed_config)
    teacher_ds = None
    if teacher_json is not None:
        teacher_ds = ds_config.fill_auto(teacher_json, train, world, total_steps, on_cpu, run.teacher.deepspeed_config)
    if run.prune is not None:
        dims = run.student.init.from_teacher
        sliced = dims is not None and dims.strategy == "sliced" and not dims.source
        prune.check(run.prune, student_ds, teacher_config, student_config, starts_from_teacher=sliced)
    source = models.teacher_weights(run.teacher) or run.student.model_name_or_path
    if teacher_tokenizer is not None:  # the teacher's start and end ids are of another vocabulary
        source = run.student.model_name_or_path
    generation_config = export.generation_config(source, student_config, len(tokenizer))
    if train.eval_draft_for:
        check_draft(run, student_config, tokenizer, student_ds, validation_split)
    prepared = Prepared(
        run=run, output_dir=Path(train.output_dir), tokenizer=tokenizer, datasets=tokenized, teacher_ds=teacher_ds,
        student_ds=student_ds, student_config=student_config, generation_config=generation_config,
        total_steps=total_steps, validation_split=validation_split, teacher_config=teacher_config,
        teacher_tokenizer=teacher_tokenizer,
    )  # fmt: skip
    return claim_output_dir(prepared, resume, overwrite) if claim else prepared


def prepare_students(runs: dict[str, RunConfig], resume: bool | str, overwrite: bool) -> dict[str, Prepared]:
    """`prepare` for each of a run's students ({name: run}; "" names a run's only one), and what students that
    share one batch stream need; only when every check has passed does each claim its output directory."""
    several = len(runs) > 1
    prepared = {}
    for name, run in runs.items():
        where = f"students.{name}: " if name else ""
        try:
            run_dir.refuse_home(Path(run.train.output_dir), "train.output_dir")
            if several and cross_tokenizer(run):
                raise ConfigError(
                    "losses.kd.cross_tokenizer does not work with several students yet (they share one batch "
                    "stream, and across tokenizers each reads its own tokens); train it as a run of its own"
                )
            prepared[name] = prepare(run, claim=False)
        except ConfigError as error:
            raise ConfigError(f"{where}{error}") from None
    kinds = {name: models.adapter_for(p.student_config).kind for name, p in prepared.items()}
    if len(set(kinds.values())) > 1:
        listed = ", ".join(f"{name}: {kind}" for name, kind in kinds.items())
        raise ConfigError(f"the students must be models of one kind to share batches ({listed})")
    return {name: claim_output_dir(p, resume, overwrite) for name, p in prepared.items()}


def claim_output_dir(p: Prepared, resume: bool | str, overwrite: bool) -> Prepared:
    """`p` with its output directory claimed (`run_dir.claim`; `resume`: True, False or "auto") and `resumes`
    set to whether it goes on from a checkpoint."""
    # rank 0's view decides for all (on node-local disks the others may see none; resuming then says so)
    has_checkpoint = dist.all_gather_objects(checkpoint.latest_tag(p.output_dir / "checkpoints") is not None)[0]
    resumes = run_dir.claim(p.output_dir, to_yaml(p.run), resume, overwrite, has_checkpoint)
    return dataclasses.replace(p, resumes=resumes)


def check_models(run: RunConfig):
    """Both models' configs (no weights), checked against the task, the losses and the metric."""
    teacher_config = None
    if run.teacher.model_name_or_path:
        teacher_config = models.load_config(models.teacher_weights(run.teacher), "teacher")
        if not run.teacher.cache:  # a run from a cache loads no teacher weights
            models.check_local_weights(models.teacher_weights(run.teacher), "teacher")
    if run.student.model_name_or_path:
        models.check_local_weights(run.student.model_name_or_path, "student")
    student_config = student_hf_config(run.student, teacher_config)
    adapter = models.adapter_for(student_config)
    if run.student.init.from_teacher is not None and teacher_config is not None:
        student, teacher = models.count_parameters(student_config), models.count_parameters(teacher_config)
        if student > teacher:
            raise ConfigError(f"student.init.from_teacher makes a student of {student / 1e6:,.1f}M parameters, "
                              f"larger than its teacher ({teacher / 1e6:,.1f}M); give it smaller dimensions")  # fmt: skip
    if run.data.task not in adapter.tasks:
        raise ConfigError(
            f"data.task '{run.data.task}' does not fit a {adapter.kind} student; use {' or '.join(adapter.tasks)}"
        )
    if run.train.eval_metric in ("bleu", "rouge") and adapter.kind != "seq2seq":
        raise ConfigError(f"train.eval_metric '{run.train.eval_metric}' needs a seq2seq model; use loss or accuracy")
    losses, _ = build_losses(run.losses, model_pair(run, student_config, teacher_config))
    if cross_tokenizer(run):
        check_cross_tokenizer(run, losses)
    if on_policy_options(run):
        if adapter.kind == "encoder":
            raise ConfigError(
                "losses.kd.on_policy: the student samples its own outputs, and an encoder-only one cannot"
            )
        if run.teacher.cache:
            raise ConfigError(
                "losses.kd.on_policy: the teacher scores the student's own samples, which no cache holds; remove "
                "teacher.cache"
            )
    if any("logits" in loss.needs for loss in losses.values()):
        for role, config in (("teacher", teacher_config), ("student", student_config)):
            if config is not None and not models.adapter_for(config).has_lm_head(config):
                raise ConfigError(f"the {role} has no LM head (a bare encoder): logit losses (ce, kd) do not apply")
        if run.data.task == "masked_lm" and run.data.mlm_probability == 0:
            raise ConfigError("data.mlm_probability is 0, so no token is a target for ce or kd; set it above 0")
    return teacher_config, student_config


def on_policy_options(run: RunConfig) -> OnPolicyOptions | None:
    """The KD term's on-policy options where the run samples (the term weighted, its fraction above 0), else
    None: the one rule for whether the KD term is also taken on the student's own samples (train/on_policy.py)."""
    kd = run.losses.get("kd")
    options = kd.options.on_policy if kd is not None and kd.weight != 0 else None
    return options if options is not None and options.fraction > 0 else None


def check_cross_tokenizer(run: RunConfig, losses: dict) -> None:
    """What a run across tokenizers can do today; the rest refused in one line before any weights load."""
    where = "losses.kd.cross_tokenizer"
    if not run.teacher.model_name_or_path:
        raise ConfigError(f"{where} distills from a teacher; set teacher.model_name_or_path")
    if run.data.task == "masked_lm":
        raise ConfigError(f"{where}: masked_lm is not aligned (each tokenizer would mask other text); use it for "
                          "translation, seq2seq or causal_lm data")  # fmt: skip
    layerwise = sorted(name for name, loss in losses.items() if loss.requires_teacher and name != "kd")
    if layerwise:
        raise ConfigError(
            f"{where}: losses {', '.join(layerwise)} compare the two models position by position, and across "
            "tokenizers positions differ; keep ce and kd"
        )
    refused = {
        "teacher.cache": (run.teacher.cache, "a cache holds the teacher's top-k over its own vocabulary"),
        "data.targets": (run.data.targets != "references", "the teacher's generated targets are not aligned yet"),
        "data.messages_field": (run.data.messages_field, "each tokenizer has a chat template of its own"),
        "losses.kd.on_policy": (on_policy_options(run), "the teacher would have to read the student's samples "
                                                        "in its own tokens"),
    }  # fmt: skip
    for key, (setting, reason) in refused.items():
        if setting:
            raise ConfigError(f"{where} does not work with {key} yet: {reason}")


def check_draft(run: RunConfig, student_config, tokenizer, student_ds: dict, validation_split: str | None) -> None:
    """What `train.eval_draft_for` needs: a target the student can draft for, a validation split, and the whole
    student on each rank."""
    where = "train.eval_draft_for"
    target = run.train.eval_draft_for
    drafting.check_pair(student_config, models.load_config(target, where), tokenizer,
                        tokenizers.load_tokenizer(target), where, bool(run.data.messages_field))  # fmt: skip
    if not validation_split:
        raise ConfigError(f"{where} measures the draft on the validation split's prompts, and the run has none")
    if ds_config.zero_stage(student_ds) == 3:
        raise ConfigError(f"{where}: a ZeRO-3 student's weights are partitioned over the ranks; use a ZeRO-2 "
                          "student, or measure its export with ds-distill evaluate --draft_for")  # fmt: skip


def model_pair(run: RunConfig, student_config, teacher_config) -> ModelPair | None:
    return ModelPair(student_config, teacher_config, run.layer_map) if teacher_config is not None else None


def check_tokenizer(run: RunConfig, teacher_config, student_config):
    """(the student's tokenizer, the teacher's where it may differ, else None): the one tokenizer both models
    share, or, across tokenizers, each model's own (fast tokenizers, which say where each token's text ends)."""
    teacher = partial(models.teacher_weights, run.teacher)  # resolved where needed
    tokenizer = tokenizers.load_tokenizer(tokenizers.tokenizer_source(run, teacher))
    teacher_tokenizer = tokenizers.teacher_tokenizer(run, teacher)
    if teacher_tokenizer is not None:
        for role, side in (("student", tokenizer), ("teacher", teacher_tokenizer)):
            if not side.is_fast:
                raise ConfigError(f"losses.kd.cross_tokenizer needs fast tokenizers (character offsets); the "
                                  f"{role}'s, {side.name_or_path}, is a slow {type(side).__name__}")  # fmt: skip
    elif teacher_config is not None and run.student.model_name_or_path:
        tokenizers.check_same_tokenizer(models.teacher_weights(run.teacher), run.student.model_name_or_path)
    for role, config, side in (("teacher", teacher_config, teacher_tokenizer or tokenizer),
                               ("student", student_config, tokenizer)):  # fmt: skip
        if config is not None and config.vocab_size < len(side):
            raise ConfigError(
                f"the {role}'s vocabulary ({config.vocab_size}) is smaller than the tokenizer's ({len(side)}); "
                "they do not belong together: set data.tokenizer to the model's own tokenizer"
            )
    return tokenizer, teacher_tokenizer


def write_run_files(p: Prepared) -> None:
    """config.yaml, the filled DeepSpeed JSONs and the export template, on the main rank."""
    if not dist.is_main():
        return
    p.output_dir.mkdir(parents=True, exist_ok=True)
    (p.output_dir / "config.yaml").write_text(to_yaml(p.run))
    (p.output_dir / "ds_config_student.json").write_text(json.dumps(p.student_ds, indent=2))
    if p.teacher_ds is not None:
        (p.output_dir / "ds_config_teacher.json").write_text(json.dumps(p.teacher_ds, indent=2))
    pruned = prune.target_config(p.student_config, p.run.prune) if p.run.prune else None
    export.save_template(
        p.output_dir / "checkpoints" / export.TEMPLATE_DIR,
        pruned or p.student_config,
        p.tokenizer,
        p.generation_config,
        pruned_from=p.student_config if pruned else None,
    )
