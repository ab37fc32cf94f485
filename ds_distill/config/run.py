"""The run configuration: typed dataclasses (one per YAML section) and the checks a run must pass before
anything loads. config/load.py reads them from YAML, recipes and dotted overrides.

A run is one YAML file (see `ds_distill/recipes/`) with the sections `teacher`, `student`, `data`,
`losses` and `train`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml

from ds_distill.config import paths
from ds_distill.config.losses import LayerMapConfig, LossTerm, NoOptions, losses_tree, parse_losses
from ds_distill.errors import ConfigError


@dataclass
class TeacherConfig:
    """The frozen teacher, run under its own DeepSpeed (ZeRO-3 inference) config."""

    model_name_or_path: str | None = None
    """Hugging Face hub id or local directory. Empty: no teacher, the student is fine-tuned on labels alone."""
    gguf_file: str | None = None
    """A GGUF file in model_name_or_path to use instead of safetensors weights (converted once per machine)."""
    deepspeed_config: str = "ds_configs/teacher_zero3_inference_cpu.json"
    cache: str | None = None
    """A directory written by `ds-distill cache_teacher` for this run: the KD term reads the teacher's top-k from
    it and no teacher loads (model_name_or_path still names the teacher, for the tokenizer and the check that
    the cache was written from it, with this data and KD temperature)."""


@dataclass
class FromTeacherConfig:
    """A student with the teacher's architecture at smaller depth and width; unset fields keep the teacher's."""

    encoder_layers: int | None = None
    """Encoder blocks (encoder-decoder and encoder-only models)."""
    decoder_layers: int | None = None
    """Decoder blocks (encoder-decoder and decoder-only models)."""
    d_model: int | None = None
    d_ff: int | None = None
    num_heads: int | None = None
    strategy: str = "random"
    """How weights start. `random`: fresh initialisation from the shrunk config; `sliced`: cut from the
    teacher's weights (`ds-distill make_student`), written to output_dir/student_init at the start."""
    layers: str = "first"
    """sliced: which teacher blocks: first | alternate | uniform | last (ds-distill make_student --help). first
    measured best (bench/RESULTS.md, "Which teacher blocks"), on a teacher of 4 blocks per stack."""
    encoder_layers_from: list[int] | None = None
    """sliced: the teacher's encoder blocks (0-based) the student's copy, instead of `layers`."""
    decoder_layers_from: list[int] | None = None
    """sliced: the teacher's decoder blocks the student's copy, instead of `layers`."""
    width: str = "importance"
    """sliced: which channels, heads and FFN neurons: importance (their activations on calibration batches of
    the run's training split; measured better than first: bench/RESULTS.md, "Quality benchmark") | first
    (the leading ones)."""
    calibration_batches: int = 8
    """sliced, width importance: training batches the teacher's activations are read on."""
    source: str | None = None
    """sliced: cut from this model (a directory or hub id) instead of the teacher, e.g. an earlier stage of a
    teacher-assistant chain (`ds-distill chain` sets it for `student_from:`)."""
    tokenizer: str | None = None
    """A vocabulary of the student's own (a tokenizer directory, e.g. from `ds-distill train_tokenizer`); sliced:
    each new token's rows start from the teacher's for the pieces of its text (`make_student --tokenizer`). KD
    then runs across tokenizers (losses.kd.cross_tokenizer)."""


@dataclass
class StudentInitConfig:
    """How a student without `model_name_or_path` starts."""

    from_teacher: FromTeacherConfig | None = None


@dataclass
class StudentConfig:
    """The student, trained under ZeRO-2 or ZeRO-3. Give a model path, or `init.from_teacher`."""

    model_name_or_path: str | None = None
    init: StudentInitConfig = field(default_factory=StudentInitConfig)
    deepspeed_config: str = "ds_configs/student_zero2.json"


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes batches. Read with `datasets.load_dataset`."""

    task: str = "translation"
    """translation | seq2seq | causal_lm | masked_lm"""
    dataset: str | None = None
    """Hub name (`wmt16`) or a builder for local files (`json`, `csv`, `parquet`, `text`)."""
    dataset_config_name: str | None = None
    data_files: dict[str, Any] | None = None
    """Local files per split, e.g. {train: a.jsonl, validation: b.jsonl}; a list of files per split works too."""
    revision: str | None = None
    """The hub dataset's revision (a branch, tag or commit; `refs/convert/parquet` for a script dataset)."""
    train_split: str = "train"
    validation_split: str | None = "validation"
    """Evaluated on; a dataset without this split trains without evaluation (said at start), unless
    `validation_split_percentage` carves one out of the training split."""
    validation_split_percentage: int | None = None
    """Percent of the training split held out for validation where the dataset has no validation split."""
    tokenizer: str | None = None
    """Tokenizer path; defaults to the teacher's (or the student's without a teacher)."""
    source_lang: str | None = None
    target_lang: str | None = None
    prefix: str = ""
    source_field: str | None = None
    target_field: str | None = None
    text_field: str = "text"
    prompt_field: str | None = None
    """causal_lm: a field holding each example's prompt. Then an example is prompt + `text_field` (its completion)
    + the end-of-sequence token, one per row, not packed, cut at block_size, and only the completion's tokens
    are targets; `generate_targets` and on-policy KD continue the prompts."""
    messages_field: str | None = None
    """causal_lm: a field holding each example's conversation, a list of {role, content} (data/conversations.py).
    Rendered with the tokenizer's chat template, one per row, not packed, cut at block_size; every assistant
    turn is a target, with its end-of-turn token. `generate_targets` and on-policy KD continue each conversation
    before its last assistant turn, and their reply takes that turn's place."""
    max_source_length: int = 128
    max_target_length: int = 128
    targets: str = "references"
    """Training examples of translation, seq2seq, prompted or conversation causal_lm data: references (the data's
    targets; a conversation's last assistant turn) |
    teacher (the `teacher_target` field that `ds-distill generate_targets` adds: sequence-level KD) | both (each
    example twice, once with each). Evaluation always scores against the references."""
    block_size: int = 128
    mlm_probability: float = 0.15
    line_by_line: bool = False
    """masked_lm: one example per line (row), cut at max_source_length (run_mlm.py's --line_by_line). False: the
    lines packed into full blocks of max_source_length tokens, each `[CLS] ... [SEP]` (the tokenizer's own special
    tokens), lines separated by [SEP], so a line longer than a block goes on into the next ones."""
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    preprocessing_num_workers: int | None = None
    """Processes that tokenize. None: one per 20,000 rows, up to the cores (one rank per node tokenizes)."""
    tokenized_path: str | None = None
    """A directory for the tokenized splits: `ds-distill prepare_data` fills it ahead of a launch, and runs
    with the same data settings and tokenizer load it at once (every node must be able to read it)."""

    def generates_from_sources(self) -> bool:
        """Whether examples have sources or prompts a model can continue (generate_targets, on-policy KD)."""
        return self.task in ("translation", "seq2seq") or self.prompted()

    def prompted(self) -> bool:
        """causal_lm examples one per row, each with a prompt: data.prompt_field or data.messages_field."""
        return self.task == "causal_lm" and bool(self.prompt_field or self.messages_field)


@dataclass
class TrainConfig:
    """Loop settings; names follow Hugging Face `TrainingArguments`."""

    output_dir: str = "runs/distill"
    max_steps: int = -1
    """Optimizer steps. -1: derive from num_train_epochs."""
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    learning_rate: float = 3e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    lr_scheduler_type: str = "linear"
    """linear | cosine | constant | constant_with_warmup, as in Hugging Face (transformers.get_scheduler):
    warmup from 0 over warmup_steps, then the schedule to max_steps."""
    logging_steps: int = 10
    eval_steps: int = 0
    """0: evaluate only at the end."""
    save_steps: int = 0
    """0: checkpoint only at the end."""
    save_total_limit: int = 2
    seed: int = 42
    ddp_timeout: int = 1800
    """Seconds a collective waits for the slowest rank before the job fails (as in Hugging Face)."""
    bf16: bool = False
    gradient_checkpointing: bool = False
    torch_compile: bool = False
    """Run the training forwards of the student and of a whole (not ZeRO-3-partitioned) teacher through
    torch.compile. Same losses and gradients (tested); no speed-up measured yet on an H100 (bench/RESULTS.md)."""
    eval_metric: str = "loss"
    """loss | accuracy | bleu | rouge: loss, perplexity and token accuracy are always reported; bleu (with chrF)
    and rouge also generate (seq2seq models)."""
    generation_max_length: int = 128
    num_beams: int = 1
    eval_draft_for: str | None = None
    """A model (hub id or directory; usually the teacher) whose speculative-decoding draft the student is measured
    as at every evaluation: acceptance rate, accepted tokens per step and speed-up in the log (`draft/*`,
    train/drafting.py), on the validation split's first prompts, by the main rank with both models whole on its
    device (a student under ZeRO-2; the target stays loaded beside it). A decoder student with a vocabulary of its
    own drafts through universal assisted decoding."""
    dataloader_num_workers: int | None = None
    """Processes that collate batches ahead of the loop. None: 2 when training on a GPU, 0 on the CPU."""
    group_by_length: bool | None = None
    """Batch examples of similar length (within windows of 50 batches, then the batches shuffled), so the
    teacher and the student compute few padding tokens; deterministic and resumable. None: on for
    translation, seq2seq and prompted causal_lm, off for packed causal_lm and masked_lm. The log reports
    `padding_fraction`."""
    dataloader_pin_memory: bool = True
    """Pinned host memory for batches on their way to a GPU (the copy then overlaps compute)."""


@dataclass
class PruneConfig:
    """HomoDistil (`method: homodistil`): the student, starting at the teacher's width, is pruned step by step to
    these widths; unset ones are not pruned. The export is a dense model of the pruned widths."""

    d_model: int | None = None
    d_ff: int | None = None
    num_heads: int | None = None
    steps: int = 1000
    """The optimizer step at which the target widths are reached (a cubic schedule from the full width)."""
    start_step: int = 0
    """Pruning starts after this step."""
    every_steps: int = 1
    """Masks tighten every this many steps."""
    score_beta: float = 0.85
    """Moving-average weight of the earlier sensitivity scores."""


@dataclass
class RunConfig:
    method: str | None = None
    """A preset (`ds-distill list`): fills `losses` and `layer_map`; what the YAML sets itself wins. (A YAML may
    also start from another with `base: FILE_OR_RECIPE`, overriding it key by key.)"""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    layer_map: LayerMapConfig = field(default_factory=LayerMapConfig)
    """The default map of the layer-wise losses; each loss can carry its own `layer_map`."""
    losses: dict[str, LossTerm] = field(
        default_factory=lambda: {"ce": LossTerm(1.0, NoOptions())}, metadata={"parse": parse_losses}
    )
    """Loss terms by registry name, each with its `weight` (0 turns a term off) and options (`ds-distill list`,
    `ds-distill keys losses`), typed as the config loads (config/losses.py). Default: `{ce: {weight: 1.0}}`."""
    train: TrainConfig = field(default_factory=TrainConfig)
    prune: PruneConfig | None = None
    """HomoDistil's width pruning (`method: homodistil` sets the losses)."""


# -- the values a run config may hold, and the checks on a whole run config (config/load.py builds the dataclasses
# from plain dicts) ------------------------------------------------------------------------------------------------


TASKS = ("translation", "seq2seq", "causal_lm", "masked_lm")
TARGETS = ("references", "teacher", "both")
TEACHER_TARGET = "teacher_target"
"""The field `ds-distill generate_targets` adds to each training example: the teacher's output text."""


STRATEGIES = ("random", "sliced")


LAYER_CHOICES = ("alternate", "uniform", "first", "last")


WIDTH_CHOICES = ("first", "importance")


LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")


EVAL_METRICS = ("loss", "accuracy", "bleu", "rouge")


def absolute_paths(run: RunConfig) -> None:
    """The run's local paths as the working directory reads them, absolute (`config/paths.py`: paths written in
    a YAML file were read from its folder when it loaded; `~` is the home directory, as in a shell)."""
    for key in paths.PATH_KEYS + paths.NAME_OR_PATH_KEYS:
        *sections, name = key.split(".")
        parent: Any = run
        for section in sections:
            parent = getattr(parent, section) if parent is not None else None
        value = getattr(parent, name) if parent is not None else None
        if isinstance(value, str) and value:
            setattr(parent, name, paths.absolute(value, key))
    if run.data.data_files:

        def absolute(path):
            local = isinstance(path, str) and paths.local_files(run.data.dataset, path)
            return paths.absolute(path, "data.data_files") if local else path

        run.data.data_files = {
            split: [absolute(p) for p in files] if isinstance(files, list) else absolute(files)
            for split, files in run.data.data_files.items()
        }


def cross_tokenizer(run: RunConfig) -> str | None:
    """`losses.kd.cross_tokenizer` (uld | hybrid) where the run distills across tokenizers, else None."""
    kd = run.losses.get("kd")
    return kd.options.cross_tokenizer if kd is not None else None


def validate(run: RunConfig) -> None:
    """Checks that need no weights and no files beyond the config itself (the run's paths expanded first); the
    loss terms' options were checked as they were typed (config/losses.py)."""
    absolute_paths(run)
    check_data(run.data)
    check_student(run)
    check_train(run.train)
    if run.method == "homodistil" and run.prune is None:
        raise ConfigError(
            "method homodistil prunes to the widths under prune: e.g. {d_model: 384, d_ff: 1024, steps: 2000}"
        )
    if run.prune is not None:
        if not 0 <= run.prune.score_beta < 1:
            raise ConfigError("prune.score_beta must lie in [0, 1)")
        if run.prune.every_steps < 1 or run.prune.steps <= run.prune.start_step:
            raise ConfigError("prune.steps must come after prune.start_step, and prune.every_steps be at least 1")
    if not run.losses:
        raise ConfigError("losses is empty: configure at least one term, e.g. {ce: {weight: 1.0}}")


def check_data(data: DataConfig) -> None:
    if data.task not in TASKS:
        raise ConfigError(f"data.task '{data.task}' is unknown; choose one of {', '.join(TASKS)}")
    if data.dataset is None:
        raise ConfigError("data.dataset is missing: give a hub name, or `json`/`csv`/`parquet`/`text` with data_files")
    if data.task == "translation" and not (data.source_lang and data.target_lang):
        raise ConfigError("data.task 'translation' needs data.source_lang and data.target_lang (e.g. en, de)")
    if data.task == "seq2seq" and not (data.source_field and data.target_field):
        raise ConfigError("data.task 'seq2seq' needs data.source_field and data.target_field (e.g. document, summary)")
    if data.targets not in TARGETS:
        raise ConfigError(f"data.targets '{data.targets}' is unknown; choose one of {', '.join(TARGETS)}")
    if data.targets != "references" and not data.generates_from_sources():
        raise ConfigError(
            f"data.targets '{data.targets}' needs sources to generate from: translation or seq2seq data, or "
            "causal_lm with data.prompt_field or data.messages_field"
        )
    for key in ("prompt_field", "messages_field"):
        if getattr(data, key) and data.task != "causal_lm":
            raise ConfigError(f"data.{key} is for causal_lm data (translation and seq2seq have sources)")
    if data.prompt_field and data.messages_field:
        raise ConfigError("set one of data.prompt_field and data.messages_field: a conversation holds its prompts")
    if data.validation_split_percentage is not None and not 0 < data.validation_split_percentage < 100:
        raise ConfigError("data.validation_split_percentage must lie between 0 and 100 (a percent, e.g. 5)")
    if data.task == "masked_lm" and not 0 <= data.mlm_probability < 1:
        raise ConfigError("data.mlm_probability must lie in [0, 1)")
    if data.line_by_line and data.task != "masked_lm":
        raise ConfigError(f"data.line_by_line applies to masked_lm only; data.task '{data.task}' does not read it")


def check_student(run: RunConfig) -> None:
    student, dims = run.student, run.student.init.from_teacher
    if bool(student.model_name_or_path) == bool(dims):
        raise ConfigError("give exactly one of student.model_name_or_path and student.init.from_teacher")
    if not dims:
        return
    if not run.teacher.model_name_or_path:
        raise ConfigError("student.init.from_teacher needs teacher.model_name_or_path")
    kd = run.losses.get("kd")
    if dims.tokenizer and not cross_tokenizer(run):
        if kd is not None and kd.weight != 0:
            raise ConfigError("student.init.from_teacher.tokenizer gives the student another vocabulary than the "
                              "teacher's: set losses.kd.cross_tokenizer (uld or hybrid)")  # fmt: skip
        if dims.strategy == "sliced" and dims.width == "importance":
            raise ConfigError("student.init.from_teacher.tokenizer with width importance: the teacher ranks channels "
                              "on its own tokens, which a run tokenizes only across tokenizers; set "
                              "losses.kd.cross_tokenizer (with kd's weight 0 to train on labels alone) or "
                              "width: first")  # fmt: skip
    for name, value, choices in (
        ("strategy", dims.strategy, STRATEGIES),
        ("layers", dims.layers, LAYER_CHOICES),
        ("width", dims.width, WIDTH_CHOICES),
    ):
        if value not in choices:
            raise ConfigError(
                f"student.init.from_teacher.{name} '{value}' is unknown; choose one of {', '.join(choices)}"
            )


def check_train(train: TrainConfig) -> None:
    if train.max_steps <= 0 and train.num_train_epochs <= 0:
        raise ConfigError("set train.max_steps or train.num_train_epochs to a positive number")
    if train.lr_scheduler_type not in LR_SCHEDULERS:
        raise ConfigError(
            f"train.lr_scheduler_type '{train.lr_scheduler_type}' is unknown; choose one of {', '.join(LR_SCHEDULERS)}"
        )
    if train.eval_metric not in EVAL_METRICS:
        raise ConfigError(
            f"train.eval_metric '{train.eval_metric}' is unknown; choose one of {', '.join(EVAL_METRICS)}"
        )
    for name in (
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "gradient_accumulation_steps",
        "logging_steps",
        "save_total_limit",
    ):
        if getattr(train, name) < 1:
            raise ConfigError(f"train.{name} must be at least 1")
    if train.dataloader_num_workers is not None and train.dataloader_num_workers < 0:
        raise ConfigError("train.dataloader_num_workers must be 0 or more")


def to_dict(run: RunConfig) -> dict[str, Any]:
    """The run config as the YAML writes it, every key spelled out."""
    return {**dataclasses.asdict(run), "losses": losses_tree(run.losses)}


def to_yaml(run: RunConfig) -> str:
    """The resolved config; a preset is already expanded into `losses` and `layer_map`, so it is only noted."""
    tree = to_dict(run)
    method = tree.pop("method")
    header = f"# expanded from method: {method}\n" if method else ""
    return header + yaml.safe_dump(tree, sort_keys=False)
