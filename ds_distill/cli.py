"""The `ds-distill` command (also `python -m ds_distill`): one verb per user task.

    ds-distill demo                                   the whole job on an embedded default, in minutes
    ds-distill distill --config=RUN.yaml [--a.b=v]    one distillation run (or --recipe=NAME)
    ds-distill prepare_data --config=RUN.yaml         tokenize to data.tokenized_path ahead of a launch
    ds-distill make_student --teacher=T --output_dir=D [--d_model ...]   a student cut from the teacher
    ds-distill chain --config=CHAIN.yaml              teacher -> assistant(s) -> student, resumable by stage
    ds-distill evaluate --model=DIR --config=RUN.yaml   loss, perplexity, BLEU + chrF or ROUGE; report + hypotheses
    ds-distill export --checkpoint_dir=D --output_dir=O
    ds-distill count_params PATH_OR_RECIPE
    ds-distill plan --config=RUN.yaml --gpus_per_node=8 --gpu_memory_gb=80   memory per GPU, what fits, fastest
    ds-distill list
    ds-distill VERB --help

Under the DeepSpeed launcher every rank runs `python -u -m ds_distill ... --local_rank=N`; that flag is
taken out here (its value is in LOCAL_RANK) so fire never sees it.
"""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path

import fire

from ds_distill.errors import ConfigError


def demo(output_dir: str = "runs/demo"):
    """Runs the whole job on an embedded default: no network, no input files, minutes on a CPU.

    Generates a small parallel corpus, trains a sentencepiece tokenizer and a small T5 teacher, cuts a student
    3.96x smaller from the teacher's weights and distils it (teacher under ZeRO-3 inference, student under ZeRO-2),
    distils a randomly initialised student of the same shape, trains that one once more without the teacher,
    all for the same steps, and prints parameters, validation loss, BLEU and inference tokens/s for all four.
    Uses the GPU when there is one.

    Args:
        output_dir: where the corpus, tokenizer, runs, TensorBoard events and exported models go; an earlier
            demo's results there are replaced.
    """
    from ds_distill.demo import run_demo

    run_demo(Path(output_dir))


def distill(
    config: str | None = None, recipe: str | None = None, resume: bool = False, overwrite: bool = False, **overrides
):
    """Runs one distillation from a YAML config or a shipped recipe, with dotted overrides.

    Examples:
        ds-distill distill --config=run.yaml --train.max_steps=100 --losses.kd.temperature=2
        ds-distill distill --recipe=flan_t5_3b_145m --train.output_dir=runs/145m
        ds-distill distill --recipe=flan_t5_3b_145m --method=cka --layer_map.decoder=last
        deepspeed --num_gpus 8 --module ds_distill distill --recipe=flan_t5_3b_145m

    Args:
        config: path of a run YAML (method, teacher, student, data, layer_map, losses, train).
        recipe: name of a shipped recipe instead (`ds-distill list` shows them).
        resume: continue from the newest complete checkpoint in train.output_dir.
        overwrite: delete an earlier run in train.output_dir first.
        **overrides: any config key as a dotted flag, e.g. --train.learning_rate=3e-4.
    """
    from ds_distill.config import load_config
    from ds_distill.trainer import distill as run_distill

    run = load_config(config, recipe, overrides)
    run_distill(run, resume=_flag(resume, "resume"), overwrite=_flag(overwrite, "overwrite"))


def chain(config: str | None = None, recipe: str | None = None, overwrite=(), **overrides):
    """Runs a teacher-assistant chain: stages in order, each a full distillation whose export becomes the next
    stage's teacher (or the source its student is cut from). Reruns resume where the chain stopped.

        ds-distill chain --config=chain.yaml
        ds-distill chain --recipe=flan_t5_3b_chain --defaults.train.max_steps=1000
        deepspeed --num_gpus 8 --module ds_distill chain --recipe=flan_t5_3b_chain
        ds-distill chain --config=chain.yaml --overwrite=l6        # redo stage l6, whose config changed

    A chain YAML has output_dir, defaults (a run config every stage starts from) and stages (each a name, any
    run keys, and optionally teacher_from / student_from: an earlier stage). Stage S runs in OUTPUT_DIR/S,
    is evaluated into OUTPUT_DIR/S/eval, and is recorded in OUTPUT_DIR/chain.json (config, fingerprint,
    export and its SHA-256, evaluation). Finished stages are never run or touched again; an unfinished one
    resumes from its newest checkpoint; a stage whose config changed is refused unless --overwrite names it.
    Every stage runs in this one launch, its engines freed before the next.

    Args:
        config: path of a chain YAML.
        recipe: a shipped chain recipe instead (flan_t5_3b_chain).
        overwrite: stage names (comma-separated) to redo although they finished or started with another config.
        **overrides: dotted keys of the chain YAML, e.g. --output_dir=runs/c --defaults.train.max_steps=10.
    """
    from ds_distill import chain as chain_module

    tree = chain_module.load(config, recipe, overrides)
    names = overwrite.split(",") if isinstance(overwrite, str) else [str(name) for name in overwrite]
    manifest = chain_module.run_chain(tree, tuple(name for name in names if name))
    from ds_distill import dist

    if dist.is_main():
        for name, stage in manifest["stages"].items():
            scores = ", ".join(f"{k} {v:.4f}" for k, v in stage["evaluation"].items())
            print(f"{name}: {stage['export']} ({scores})")


def prepare_data(config: str | None = None, recipe: str | None = None, **overrides):
    """Tokenizes a run's data to disk ahead of a launch, so that the launch starts training at once.

        ds-distill prepare_data --config=RUN.yaml --data.tokenized_path=/shared/wmt13_es_en_tokenized

    Loads the configured splits (hub or local files), tokenizes them with the machine's cores
    (--data.preprocessing_num_workers to choose) and writes them to data.tokenized_path with a description
    of the settings. Runs whose data settings and tokenizer match load them from there (memory-mapped, every
    rank at once); runs with other settings are refused with the list of what differs.

    Args:
        config: path of the run YAML whose data section to prepare.
        recipe: name of a shipped recipe instead.
        **overrides: dotted flags, e.g. --data.tokenized_path=DIR --data.max_train_samples=100000.
    """
    from ds_distill import data
    from ds_distill.config import load_config

    run = load_config(config, recipe, overrides)
    if not run.data.tokenized_path:
        raise ConfigError(
            "set data.tokenized_path: the directory to write (one that every node of the launch can read)"
        )
    tokenizer = data.load_tokenizer(data.tokenizer_source(run))
    tokenized = data.tokenize(run.data, tokenizer, data.load_raw(run.data))
    data.check_unknown_tokens(run.data, tokenizer, tokenized[run.data.train_split])
    path = data.save_prepared(run.data, tokenizer, tokenized)
    print(f"wrote {', '.join(f'{split}: {len(rows):,} rows' for split, rows in tokenized.items())} to {path}")


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
        layers: first (the default: it measured best) | alternate (every k-th block, ending with the last) |
            uniform (first to last, evenly) | last.
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
        overwrite: replace output_dir even if it is not an earlier make_student output.
    """
    from ds_distill import models, run_dir
    from ds_distill.config import FromTeacherConfig, coerce
    from ds_distill.surgery import students

    target = Path(output_dir)
    run_dir.check_target(
        target, run_dir.STUDENT_MARKER, "an earlier make_student output", _flag(overwrite, "overwrite")
    )
    given = {
        "encoder_layers": encoder_layers,
        "decoder_layers": decoder_layers,
        "d_model": d_model,
        "d_ff": d_ff,
        "num_heads": num_heads,
    }
    teacher_config = models.load_config(teacher, "teacher")
    if target_params is not None:
        proposals = students.propose_dims(teacher_config, students.parse_count(target_params))
        print(f"dimensions near {target_params} (parameters counted on the meta device):")
        for dims, count in proposals:
            shown = {k: v for k, v in vars(dims).items() if k in given and v is not None}
            print(f"  {count / 1e6:,.1f}M  " + "  ".join(f"--{k}={v}" for k, v in shown.items()))
        best = vars(proposals[0][0])
        given = {k: v if v is not None else best.get(k) for k, v in given.items()}
    dims = FromTeacherConfig(
        **{k: coerce(v, int | None, k) for k, v in given.items()},
        strategy="sliced",
        layers=layers,
        encoder_layers_from=coerce(encoder_layers_from, list[int] | None, "encoder_layers_from"),
        decoder_layers_from=coerce(decoder_layers_from, list[int] | None, "decoder_layers_from"),
        width=width,
        calibration_batches=calibration_batches,
    )
    calibration = _calibration(data, teacher, calibration_batches) if data else None
    student_config, plan = students.make_student(teacher, target, dims, calibration)
    teacher_count, student_count = models.count_parameters(teacher_config), models.count_parameters(student_config)
    print(f"kept, of teacher {teacher}:\n{plan.summary()}")
    print(f"wrote {target}: {student_count / 1e6:,.1f}M parameters ({teacher_count / student_count:.1f}x smaller)")


def _calibration(config: str, teacher: str, count: int):
    """Calibration batches from a YAML's data section: a seeded sample of the training split, tokenized with
    the teacher's tokenizer (only the sampled rows)."""
    import datasets

    from ds_distill import batches, data
    from ds_distill.config import DataConfig, TrainConfig, from_dict, read_tree
    from ds_distill.surgery.students import calibration_rows

    tree = read_tree(Path(config))
    if "data" not in tree:
        raise ConfigError(f"--data={config} has no data: section to draw calibration batches from")
    data_config = from_dict(DataConfig, tree["data"], "data")
    train = {k: v for k, v in tree.get("train", {}).items() if k in ("per_device_train_batch_size", "seed")}
    train = from_dict(TrainConfig, train, "train")
    size, seed = train.per_device_train_batch_size, train.seed
    tokenizer = data.load_tokenizer(teacher)
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
    from ds_distill.export import export_checkpoint

    path = export_checkpoint(checkpoint_dir, output_dir, tag, overwrite=_flag(overwrite, "overwrite"))
    print(f"exported {checkpoint_dir} to {path}")


def evaluate(
    model: str,
    config: str | None = None,
    recipe: str | None = None,
    output_dir: str | None = None,
    split: str | None = None,
    metric: str | None = None,
    num_beams: int | None = None,
    max_new_tokens: int | None = None,
    batch_size: int | None = None,
    deepspeed_config: str | None = None,
    **overrides,
):
    """Scores a model on a run's data: loss, perplexity, token accuracy, and BLEU + chrF (translation) or ROUGE-L (seq2seq)
    of its generations against the raw reference texts (sacrebleu's own tokenisation).

        ds-distill evaluate --model=runs/145m/model --config=run.yaml --num_beams=4
        ds-distill evaluate --model=runs/145m/checkpoints --recipe=flan_t5_3b_145m --split=test
        ds-distill evaluate --model=DIR --data.task=translation --data.dataset=json \
            --data.data_files.validation=valid.jsonl --data.source_lang=en --data.target_lang=de
        deepspeed --num_gpus 8 --module ds_distill evaluate --model=DIR --config=run.yaml   # ZeRO-3 over 8 GPUs

    Writes OUTPUT_DIR/report.json (metrics, model, data, generation settings), hypotheses.txt and
    references.txt (one line per example, in the data's order). A checkpoints directory is exported to
    OUTPUT_DIR/model first. The model loads as the run's teacher does (its DeepSpeed JSON: ZeRO-3 inference
    partitions a large model over the ranks, and generation keeps them in step).

    Args:
        model: a Hugging Face model directory or hub id, or a run's checkpoints directory.
        config: a run YAML whose data section (and train.generation_max_length, num_beams) to use.
        recipe: a shipped recipe instead.
        output_dir: where the report goes; default: `eval` beside the model directory.
        split: the data split to score (default: data.validation_split).
        metric: bleu (with chrF) | rouge | accuracy | loss (loss, perplexity and token accuracy are always
            reported); default by data.task: translation bleu, seq2seq rouge, else loss.
        num_beams: beams for generation (default: train.num_beams).
        max_new_tokens: generation length limit (default: train.generation_max_length).
        batch_size: examples per rank per batch (default: train.per_device_eval_batch_size).
        deepspeed_config: where the model lives (default: teacher.deepspeed_config of the run).
        **overrides: dotted flags such as --data.max_eval_samples=500.
    """
    import dataclasses

    from ds_distill.config import EVAL_METRICS, load_config
    from ds_distill.evaluation import DEFAULT_METRIC, evaluate_model

    run = load_config(config, recipe, overrides)
    metric = metric or DEFAULT_METRIC.get(run.data.task, "loss")
    if metric not in EVAL_METRICS:
        raise ConfigError(f"metric '{metric}' is unknown; choose one of {', '.join(EVAL_METRICS)}")
    chosen = {"eval_metric": metric, "num_beams": num_beams, "generation_max_length": max_new_tokens,
              "per_device_eval_batch_size": batch_size}  # fmt: skip
    run = dataclasses.replace(run, train=dataclasses.replace(
        run.train, **{k: v for k, v in chosen.items() if v is not None}
    ))  # fmt: skip
    target = Path(output_dir) if output_dir else Path(model.rstrip("/")).parent / "eval"
    results = evaluate_model(model, run, target, split, deepspeed_config)
    from ds_distill import dist

    dist.print_main(", ".join(f"{name} {value:.4f}" for name, value in results.items()) + f"; report in {target}")


def count_params(path_or_recipe: str):
    """Counts parameters on the meta device (no weights needed) for a model path, hub id, run YAML or recipe.

    For a run config or recipe it prints the teacher, the student and the compression ratio; for a chain,
    each stage (its teacher being the student of the stage it comes from) and the chain's overall ratio.
    """
    from ds_distill import config as config_module
    from ds_distill import models

    is_yaml = path_or_recipe.endswith((".yaml", ".yml"))
    is_recipe = not is_yaml and (config_module.RECIPES_DIR / f"{path_or_recipe}.yaml").is_file()
    if not (is_yaml or is_recipe):
        hf_config = models.load_config(path_or_recipe, "model")
        print(f"{path_or_recipe}: {models.count_parameters(hf_config) / 1e6:,.1f}M parameters")
        return
    if "stages" in config_module.read_tree(
        Path(path_or_recipe) if is_yaml else config_module.recipe_path(path_or_recipe)
    ):
        from ds_distill import chain

        _count_chain(chain.load(path_or_recipe if is_yaml else None, None if is_yaml else path_or_recipe, {}))
        return
    run = config_module.load_config(path_or_recipe if is_yaml else None, None if is_yaml else path_or_recipe)
    teacher_config = None
    if run.teacher.model_name_or_path:
        teacher_config = models.load_config(run.teacher.weights(), "teacher")
    _count_run(run, teacher_config)


def _count_run(run, teacher_config, student_config=None):
    """Prints teacher, student (and pruned export) sizes; returns the exported student's config."""
    from ds_distill import models
    from ds_distill.student import student_hf_config
    from ds_distill.surgery.prune import target_config

    student_config = student_config or student_hf_config(run.student, teacher_config)
    student = models.count_parameters(student_config)
    teacher = models.count_parameters(teacher_config) if teacher_config is not None else None
    if teacher is not None:
        print(f"teacher {run.teacher.model_name_or_path}: {teacher / 1e6:,.1f}M parameters")
    if run.prune is not None:
        print(f"student while pruning: {student / 1e6:,.1f}M parameters")
        student_config = target_config(student_config, run.prune)
        student = models.count_parameters(student_config)
        label = "student after pruning (the export)"
    else:
        label = "student"
    ratio = f" ({teacher / student:.1f}x smaller)" if teacher is not None else ""
    print(f"{label}: {student / 1e6:,.1f}M parameters{ratio}")
    return student_config


def _chain_stages(tree):
    """(name, run, teacher config, student config as trained, export config) per stage of a chain, each stage's
    teacher (and the model its student is cut from) being an earlier stage's export, known before it exists."""
    import dataclasses

    from ds_distill import chain, models
    from ds_distill.student import student_hf_config
    from ds_distill.surgery.prune import target_config

    exported = {}
    for name, run, stage in chain.describe(tree):
        if stage.teacher_from:
            teacher_config = exported[stage.teacher_from]
            run = dataclasses.replace(
                run, teacher=dataclasses.replace(run.teacher, model_name_or_path=f"stage {stage.teacher_from}")
            )
        else:
            teacher_config = models.load_config(run.teacher.weights(), "teacher")
        source = teacher_config
        if stage.student_from:
            source = exported[stage.student_from]
            dims = dataclasses.replace(run.student.init.from_teacher, source=None)
            student = dataclasses.replace(run.student, init=dataclasses.replace(run.student.init, from_teacher=dims))
            run = dataclasses.replace(run, student=student)
        student_config = student_hf_config(run.student, source)
        exported[name] = target_config(student_config, run.prune) if run.prune else student_config
        yield name, run, teacher_config, student_config, exported[name]


def _count_chain(tree):
    """Every stage of a chain, and the chain's overall ratio."""
    from ds_distill import models

    first = last = None
    for name, run, teacher_config, student_config, export_config in _chain_stages(tree):
        print(f"stage {name}:")
        _count_run(run, teacher_config, student_config)
        first = first or models.count_parameters(teacher_config)
        last = export_config
    print(f"chain: {first / 1e6:,.1f}M -> {models.count_parameters(last) / 1e6:,.1f}M parameters "
          f"({first / models.count_parameters(last):.1f}x smaller)")  # fmt: skip


def plan(
    config: str | None = None,
    recipe: str | None = None,
    gpus_per_node: int = 1,
    nodes: int = 1,
    gpu_memory_gb: float = 80.0,
    cpu_memory_gb: float | None = None,
    **overrides,
):
    """Memory per GPU and per node for every placement of the teacher and the student; which fit, which is
    fastest and the overrides that select it. Needs no GPU and no weights (shapes come from the configs).

        ds-distill plan --recipe=flan_t5_3b_145m --gpus_per_node=8 --gpu_memory_gb=80 --cpu_memory_gb=1000
        ds-distill plan --config=run.yaml --gpu_memory_gb=24 --train.per_device_train_batch_size=16

    Counts the teacher's weights per placement (whole, ZeRO-3 partition plus gathered modules, or offloaded),
    the student's weights, gradients and Adam states (DeepSpeed's estimators), and the step's activations and
    loss tensors, traced on the CPU at the run's widths, lengths, dtype and micro-batch (longest examples;
    10-20 s). A chain config (`stages:`) is planned stage by stage. Measured against H100 peaks: within 0.6%
    (bench/RESULTS.md).

    Args:
        config: path of a run YAML (or --recipe=NAME).
        recipe: name of a shipped recipe (`ds-distill list`).
        gpus_per_node: GPUs (ranks) per node.
        nodes: number of nodes.
        gpu_memory_gb: memory of one GPU, e.g. 80 for an H100, 141 for an H200, 40 or 80 for an A100.
        cpu_memory_gb: host memory per node; default this machine's.
        **overrides: dotted run settings, e.g. --train.per_device_train_batch_size=64.
    """
    from ds_distill import plan as planner
    from ds_distill.config import load_config

    hardware = planner.Hardware(
        gpus_per_node, nodes, gpu_memory_gb, planner.host_memory_gb() if cpu_memory_gb is None else cpu_memory_gb
    )
    print("tracing one training step on the CPU at the run's shapes ...", file=sys.stderr)
    if not _is_chain(config, recipe):
        run = load_config(config, recipe, overrides)
        print(planner.report(planner.make_plan(run, hardware, planner.tokenizer_size(run))))
        return
    from ds_distill import chain

    vocab = None
    for name, run, teacher_config, student_config, _ in _chain_stages(chain.load(config, recipe, overrides)):
        vocab = vocab or planner.tokenizer_size(run)  # the first stage's teacher has it; later stages share it
        stage = planner.make_plan(run, hardware, vocab, configs=(teacher_config, student_config))
        stage.flag_prefix = "defaults."  # for every stage; a stage's own section in the YAML overrides them
        print(f"stage {name}:\n{planner.report(stage)}\n")


def _is_chain(config: str | None, recipe: str | None) -> bool:
    from ds_distill import chain
    from ds_distill.config import read_tree, recipe_path

    if bool(config) == bool(recipe):
        raise ConfigError("give --config=RUN.yaml or --recipe=NAME")
    return chain.is_chain(read_tree(Path(config) if config else recipe_path(recipe)))


def list_components():
    """Lists shipped recipes, methods, loss terms, layer-map strategies, model families and DeepSpeed configs."""
    from ds_distill.config import RECIPES_DIR
    from ds_distill.ds_config import PROJECT_ROOT
    from ds_distill.layer_map import describe_strategies
    from ds_distill.losses import describe_losses
    from ds_distill.methods import METHODS
    from ds_distill.models import ADAPTERS

    print("recipes (ds-distill distill --recipe=NAME):")
    for path in sorted(RECIPES_DIR.glob("[!_]*.yaml")):  # _*.yaml: bases that recipes share
        first = path.read_text().splitlines()[0].lstrip("# ").strip()
        print(f"  {path.stem:<24} {first}")
    print("methods (method: NAME at the top of a run config; presets of losses and layer maps):")
    for name, method in METHODS.items():
        print(f"  {name:<24} {method.summary}")
    print("losses (the YAML's losses: section):")
    for name, line in describe_losses().items():
        print(f"  {name:<24} {line.split(': ', 1)[-1]}")
    print("layer-map strategies (layer_map.encoder / layer_map.decoder, or a loss's own layer_map):")
    for name, line in describe_strategies().items():
        print(f"  {name:<24} {line}")
    print("model families:")
    for adapter in ADAPTERS:
        print(f"  {adapter.name:<24} {adapter.kind}: {', '.join(adapter.model_types)}")
    print("DeepSpeed configs (ds_configs/):")
    for path in sorted((PROJECT_ROOT / "ds_configs").glob("*.json")):
        print(f"  {path.name}")


VERBS = {
    "demo": demo,
    "distill": distill,
    "prepare_data": prepare_data,
    "make_student": make_student,
    "export": export,
    "count_params": count_params,
    "list": list_components,
    "chain": chain,
    "evaluate": evaluate,
    "plan": plan,
}


def _flag(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigError(f"--{name} takes no value (got {value!r})")


def strip_launcher_flags(argv: list[str]) -> list[str]:
    """Removes `--local_rank=N` / `--local_rank N` (the DeepSpeed launcher adds it) and exports LOCAL_RANK."""
    out, skip_next = [], False
    for i, arg in enumerate(argv):
        if skip_next:
            skip_next = False
            continue
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip_next = True
        else:
            out.append(arg)
    return out


def usage() -> str:
    lines = ["usage: ds-distill VERB [ARGS]   (ds-distill VERB --help for details)", "", "verbs:"]
    for name, function in VERBS.items():
        lines.append(f"  {name:<14} {inspect.getdoc(function).splitlines()[0]}")
    return "\n".join(lines)


def verb_help(name: str) -> str:
    function = VERBS[name]
    signature = inspect.signature(function)
    return f"usage: ds-distill {name} {_flags(signature)}\n\n{inspect.getdoc(function)}"


def _flags(signature: inspect.Signature) -> str:
    parts = []
    for param in signature.parameters.values():
        if param.kind is param.VAR_KEYWORD:
            parts.append("[--SECTION.KEY=VALUE ...]")
        elif param.kind is param.VAR_POSITIONAL:
            continue
        elif param.default is inspect.Parameter.empty:
            parts.append(f"--{param.name}=VALUE")
        else:
            parts.append(f"[--{param.name}]")
    return " ".join(parts)


def main(argv: list[str] | None = None) -> None:
    argv = strip_launcher_flags(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    if argv[0] not in VERBS:
        print(f"error: unknown verb '{argv[0]}'\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    if any(arg in ("-h", "--help") for arg in argv[1:]):
        print(verb_help(argv[0]))
        return
    try:
        fire.Fire(VERBS[argv[0]], command=argv[1:], name=f"ds-distill {argv[0]}")
    except ConfigError as error:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    from ds_distill import dist

    dist.shutdown()


if __name__ == "__main__":
    main()
