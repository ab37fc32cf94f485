"""Verbs about a student's weights, size and vocabulary: `make_student`, `export`, `count_params`,
`train_tokenizer`."""

from __future__ import annotations

from pathlib import Path

from ds_distill.cli.args import flag
from ds_distill.errors import ConfigError


def make_student(
    teacher: str,
    output_dir: str,
    encoder_layers: int | None = None,
    decoder_layers: int | None = None,
    d_model: int | None = None,
    d_ff: int | None = None,
    num_heads: int | None = None,
    layers: str = "first",
    encoder_layers_from=None,
    decoder_layers_from=None,
    width: str = "first",
    data: str | None = None,
    calibration_batches: int = 8,
    target_params: str | None = None,
    tokenizer: str | None = None,
    overwrite: bool = False,
):
    """Cuts a student from a teacher's weights into a Hugging Face directory that from_pretrained loads.

        ds-distill make_student --teacher=google/flan-t5-xl --output_dir=students/145m \
            --encoder_layers=12 --decoder_layers=12 --d_model=512 --d_ff=2048 --num_heads=8
        ds-distill make_student --teacher=DIR --output_dir=OUT --target_params=145M --width=importance --data=run.yaml

    Depth: the student's blocks copy teacher blocks chosen by --layers, or listed per stack. Width: the same
    hidden channels, heads and FFN neurons are kept through every matrix that reads or writes them (embeddings,
    every q/k/v/o of self- and cross-attention, gated and plain FFNs, norms, T5's relative position bias, the LM
    head): the leading ones (--width=first) or those with the largest activations on calibration batches
    (--width=importance, as NVIDIA's Minitron ranks them: a seeded sample across the training split). Heads are
    chosen per block (every block keeps as many), except in T5-family models, whose relative position bias
    serves all blocks of a stack: there one head set serves the stack. Under grouped-query attention whole
    key/value groups are kept. Where heads may narrow (BERT, BART, GPT-2), query/key and value/output channels
    are ranked apart. Width-dependent scales (T5's tied output scale, BART's embedding scale) are folded into
    the weights, so the student computes what the teacher computes on the kept units. The teacher is read one
    tensor at a time, so cutting needs memory for the student, not the teacher (importance loads the teacher
    once to rank). Prints what it kept and the student's size. Unset dimensions keep the teacher's.

    Args:
        teacher: hub id or directory of the teacher (safetensors weights).
        output_dir: the directory to write; an earlier make_student output there is replaced.
        encoder_layers: encoder blocks of the student.
        decoder_layers: decoder blocks of the student.
        d_model: hidden width (a whole number of heads: num_heads x the teacher's head width).
        d_ff: feed-forward width.
        num_heads: attention heads.
        layers: first (measured best) | alternate (every k-th block, ending with the last) | uniform (evenly) | last.
        encoder_layers_from: the teacher's encoder blocks (0-based) to copy, e.g. 0,2,4, instead of --layers.
        decoder_layers_from: the teacher's decoder blocks to copy.
        width: first | importance. A run's from_teacher.width defaults to importance (it has the data; cut
            students ranked so scored better in bench/RESULTS.md); here first is the default, as importance
            needs --data.
        data: a YAML whose data: section (and train.per_device_train_batch_size, default 8) gives the
            calibration batches (--width=importance); a whole run config does too. Only the sampled rows are
            tokenized.
        calibration_batches: how many batches of that batch size to rank on.
        target_params: a size such as 145M: proposes dimensions near it (count_params confirms them) and uses
            the closest for the dimensions not given.
        tokenizer: a tokenizer directory (e.g. from ds-distill train_tokenizer) to give the student instead of
            the teacher's: each new token's embedding and head row start as the mean of the teacher's rows for
            the pieces the teacher splits its text into (surgery/vocabulary.py); prints how many tokens map to
            one piece, several or none. Train it across tokenizers (losses.kd.cross_tokenizer).
        overwrite: replace output_dir even if it is not an earlier make_student output.
    """
    from ds_distill import models
    from ds_distill.config import run_dir
    from ds_distill.config.run import FromTeacherConfig
    from ds_distill.config.typed import coerce
    from ds_distill.data import tokenizers
    from ds_distill.surgery import students
    from ds_distill.surgery.vocabulary import transplant

    target = Path(output_dir)
    run_dir.check_target(target, run_dir.STUDENT_MARKER, "an earlier make_student output", flag(overwrite, "overwrite"))
    given = dict(encoder_layers=encoder_layers, decoder_layers=decoder_layers, d_model=d_model, d_ff=d_ff,
                 num_heads=num_heads)  # fmt: skip
    teacher_config = models.load_config(teacher, "teacher")
    if target_params is not None:
        given = _near_target(teacher_config, target_params, given)
    layers_from = {f"{stack}_layers_from": coerce(value, list[int] | None, f"{stack}_layers_from")
                   for stack, value in (("encoder", encoder_layers_from), ("decoder", decoder_layers_from))}  # fmt: skip
    dims = FromTeacherConfig(**{k: coerce(v, int | None, k) for k, v in given.items()}, **layers_from,
                             strategy="sliced", layers=layers, width=width, calibration_batches=calibration_batches)  # fmt: skip
    calibration = students.calibration_batches(data, teacher, calibration_batches) if data else None
    vocabulary = tokenizers.load_tokenizer(tokenizer) if tokenizer else None  # refused before anything is cut
    student_config, plan = students.make_student(teacher, target, dims, calibration)
    if vocabulary is not None:
        coverage = transplant(target, tokenizers.load_tokenizer(teacher), vocabulary)
        student_config = models.load_config(str(target), "student")
        print(f"vocabulary of {tokenizer}: {coverage.summary()}")
    teacher_count, student_count = models.count_parameters(teacher_config), models.count_parameters(student_config)
    print(f"kept, of teacher {teacher}:\n{plan.summary()}")
    print(f"wrote {target}: {student_count / 1e6:,.1f}M parameters ({_compared(teacher_count, student_count)})")


def _compared(teacher: int, student: int) -> str:
    """'20.0x smaller' than the teacher, or 'the teacher's size' / '1.3x larger' where it is not smaller."""
    if student < teacher:
        return f"{teacher / student:.1f}x smaller"
    return "the teacher's size" if student == teacher else f"{student / teacher:.1f}x larger than the teacher"


def _near_target(teacher_config, target_params: str, given: dict) -> dict:
    """Prints the dimensions proposed near `target_params` and fills the ones not given from the closest."""
    from ds_distill import models
    from ds_distill.surgery import students

    target, teacher = students.parse_count(target_params), models.count_parameters(teacher_config)
    if target >= teacher:
        raise ConfigError(f"--target_params {target_params} is not below the teacher's {teacher / 1e6:,.1f}M "
                          "parameters: a student is cut smaller")  # fmt: skip
    proposals = students.propose_dims(teacher_config, target)
    print(f"dimensions near {target_params} (parameters counted on the meta device):")
    for dims, count in proposals:
        shown = {k: v for k, v in vars(dims).items() if k in given and v is not None}
        print(f"  {count / 1e6:,.1f}M  " + "  ".join(f"--{k}={v}" for k, v in shown.items()))
    best = vars(proposals[0][0])
    return {k: v if v is not None else best.get(k) for k, v in given.items()}


def export(checkpoint_dir: str, output_dir: str, tag: str | None = None, overwrite: bool = False):
    """Turns a run's ZeRO checkpoint (stage 2 or 3) into a Hugging Face directory that from_pretrained loads.

    An earlier export at output_dir is replaced; any other non-empty directory is refused unless --overwrite
    is given, and a run directory, its checkpoints, the working or home directory never are.

    Args:
        checkpoint_dir: a run's `output_dir/checkpoints`.
        output_dir: the directory to write (config, model.safetensors, tokenizer, generation config).
        tag: a checkpoint such as step_200; default: the newest complete one.
        overwrite: replace output_dir even if it is not an earlier export.
    """
    from ds_distill.train.export import export_checkpoint

    path = export_checkpoint(checkpoint_dir, output_dir, tag, overwrite=flag(overwrite, "overwrite"))
    print(f"exported {checkpoint_dir} to {path}")


def count_params(path_or_recipe: str | None = None, recipe: str | None = None, config: str | None = None,
                 **overrides):  # fmt: skip
    """Counts parameters on the meta device (no weights needed) for a model path, hub id, run YAML or recipe.

        ds-distill count_params google/flan-t5-xl
        ds-distill count_params --recipe=flan_t5_3b_145m          (or: count_params flan_t5_3b_145m)
        ds-distill count_params --config=run.yaml
        ds-distill count_params --recipe=flan_t5_3b_145m --student.init.from_teacher.d_model=640

    For a run config or recipe it prints the teacher, the student and the compression ratio (every student of
    a config with `students:`); for a chain, each stage (its teacher being the student of the stage it comes
    from) and the chain's overall ratio.

    Args:
        path_or_recipe: a model directory or hub id, a run YAML or a recipe name.
        recipe: a shipped recipe (`ds-distill list`), instead of path_or_recipe.
        config: a run or chain YAML, instead of path_or_recipe.
        **overrides: dotted keys of the run or chain config, as `distill` and `plan` take them.
    """
    from ds_distill import chain, models
    from ds_distill.config import load as config_module

    given = [value for value in (path_or_recipe, recipe, config) if value]
    if len(given) != 1:
        raise ConfigError("give one of: a model path or hub id, --recipe=NAME or --config=RUN.yaml")
    name = str(given[0])
    is_yaml = bool(config) or name.endswith((".yaml", ".yml"))
    is_recipe = bool(recipe) or (not is_yaml and (config_module.RECIPES_DIR / f"{name}.yaml").is_file())
    if not (is_yaml or is_recipe):
        if overrides:
            raise ConfigError(f"--{next(iter(overrides))}: a model is counted as it is; overrides apply to a config")
        hf_config = models.load_config(name, "model")
        print(f"{name}: {models.count_parameters(hf_config) / 1e6:,.1f}M parameters")
        return
    yaml_path, recipe_name = (name, None) if is_yaml else (None, name)
    if chain.is_chain(config_module.read_tree(Path(name) if is_yaml else config_module.recipe_path(name))):
        _count_chain(chain.load(yaml_path, recipe_name, overrides))
        return
    tree = config_module.load_tree(yaml_path, recipe_name, overrides)
    runs = config_module.parse_students(tree) if "students" in tree else {None: config_module.parse_run(tree)}
    first = next(iter(runs.values()))
    teacher_config = None
    if first.teacher.model_name_or_path:
        teacher_config = models.load_config(models.teacher_weights(first.teacher), "teacher")
    for index, (student, run) in enumerate(runs.items()):
        _count_run(run, teacher_config, show_teacher=index == 0, name=f"student {student}" if student else "student")


def _count_run(run, teacher_config, student_config=None, show_teacher=True, name="student"):
    """Prints teacher, student (and pruned export) sizes; returns the exported student's config."""
    from ds_distill import models
    from ds_distill.surgery.prune import target_config
    from ds_distill.train.student import student_hf_config

    student_config = student_config or student_hf_config(run.student, teacher_config)
    student = models.count_parameters(student_config)
    teacher = models.count_parameters(teacher_config) if teacher_config is not None else None
    if teacher is not None and show_teacher:
        print(f"teacher {run.teacher.model_name_or_path}: {teacher / 1e6:,.1f}M parameters")
    if run.prune is not None:
        print(f"{name} while pruning: {student / 1e6:,.1f}M parameters")
        student_config = target_config(student_config, run.prune)
        student = models.count_parameters(student_config)
        label = f"{name} after pruning (the export)"
    else:
        label = name
    ratio = f" ({_compared(teacher, student)})" if teacher is not None else ""
    print(f"{label}: {student / 1e6:,.1f}M parameters{ratio}")
    return student_config


def _count_chain(tree):
    """Every stage of a chain, and the chain's overall ratio."""
    from ds_distill import chain, models

    first = last = None
    for name, run, teacher_config, student_config, export_config in chain.planned_stages(tree):
        print(f"stage {name}:")
        _count_run(run, teacher_config, student_config)
        first = first or models.count_parameters(teacher_config)
        last = export_config
    print(f"chain: {first / 1e6:,.1f}M -> {models.count_parameters(last) / 1e6:,.1f}M parameters "
          f"({_compared(first, models.count_parameters(last))})")  # fmt: skip


def train_tokenizer(
    config: str | None = None,
    recipe: str | None = None,
    vocab_size: int = 8000,
    output_dir: str | None = None,
    overwrite: bool = False,
    **overrides,
):
    """Trains a compact vocabulary of the teacher's kind on a run's training text, for a student of its own.

        ds-distill train_tokenizer --config=RUN.yaml --vocab_size=8000 --output_dir=DIR
        ds-distill distill --config=RUN.yaml --student.init.from_teacher.tokenizer=DIR --losses.kd.cross_tokenizer=hybrid

    The run's tokenizer (data.tokenizer, else the teacher's; across tokenizers the student's), retrained by the
    `tokenizers` library
    (`train_new_from_iterator`): the same normaliser, pre-tokenizer, model (SentencePiece unigram, byte-level
    BPE, ...) and special tokens, with `vocab_size` pieces learned from every text the run tokenizes of its
    training split (sources and targets, prompts and completions). A student with it is trained across
    tokenizers (`losses.kd.cross_tokenizer`). Prints how many tokens each tokenizer spends per byte of the
    validation split (or the training split).

    Args:
        config: the run YAML whose data to learn from.
        recipe: name of a shipped recipe instead.
        vocab_size: pieces of the new vocabulary, special tokens included.
        output_dir: the directory to write (a Hugging Face tokenizer).
        overwrite: replace output_dir if it holds a tokenizer already.
        **overrides: dotted flags, e.g. --data.max_train_samples=200000.
    """
    from functools import partial

    from ds_distill import models
    from ds_distill.config.load import load_config
    from ds_distill.data import tokenized as data
    from ds_distill.data import tokenizers

    if not output_dir:
        raise ConfigError("give --output_dir: the directory to write the tokenizer to")
    if vocab_size < 16:
        raise ConfigError(f"--vocab_size={vocab_size}: a vocabulary needs at least 16 pieces")
    path = Path(output_dir)
    if (path / "tokenizer_config.json").is_file() and not flag(overwrite, "overwrite"):
        raise ConfigError(f"{path} holds a tokenizer already; pass --overwrite to replace it")
    run = load_config(config, recipe, overrides)
    source = tokenizers.load_tokenizer(tokenizers.tokenizer_source(run, partial(models.teacher_weights, run.teacher)))
    raw = data.load_raw(run.data)
    train = run.data.train_split
    trained = tokenizers.train_like(source, data.texts(run.data, data.limited(run.data, train, raw[train]), train),
                                    vocab_size)  # fmt: skip
    trained.save_pretrained(path)
    held_out = next((split for split in raw if split != train), train)
    sample = data.texts(run.data, raw[held_out].select(range(min(len(raw[held_out]), 2000))), held_out)
    text_bytes = sum(len(text.encode()) for text in sample)
    for name, tokenizer in ((f"{source.name_or_path} (the run's)", source), (str(path), trained)):
        tokens = sum(len(ids) for ids in tokenizer(sample, add_special_tokens=False)["input_ids"])
        print(f"{name}: {len(tokenizer):,} tokens, {tokens / text_bytes:.3f} tokens per byte of {held_out}")
