"""Verbs that run the job: `demo`, `distill`, `chain`, `prepare_data`, `cache_teacher`, `generate_targets`."""

from __future__ import annotations

from pathlib import Path

from ds_distill.cli.args import flag, resume_flag
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
    config: str | None = None,
    recipe: str | None = None,
    resume: bool | str = False,
    overwrite: bool = False,
    **overrides,
):
    """Runs one distillation from a YAML config or a shipped recipe, with dotted overrides.

    Examples:
        ds-distill distill --config=run.yaml --train.max_steps=100 --losses.kd.temperature=2
        ds-distill distill --config=run.yaml --teacher.cache=DIR     # KD from `ds-distill cache_teacher`'s DIR
        ds-distill distill --recipe=flan_t5_3b_145m --train.output_dir=runs/145m
        ds-distill distill --recipe=flan_t5_3b_145m --method=cka --layer_map.decoder=last
        deepspeed --num_gpus 8 --module ds_distill distill --recipe=flan_t5_3b_145m

    A config with `students:` (a name per student, each overriding the run's sections key by key) trains them
    all on one teacher pass, each into train.output_dir/NAME (train/loop.py).

    Args:
        config: path of a run YAML (method, teacher, student, data, layer_map, losses, train; students).
        recipe: name of a shipped recipe instead (`ds-distill list` shows them).
        resume: continue from the newest complete checkpoint in train.output_dir. --resume=auto: continue the
            same run (same config) when it has a checkpoint, start it otherwise; the launch scripts pass it, so
            the same command run again, or a requeued job, goes on where it stopped.
        overwrite: delete an earlier run in train.output_dir first.
        **overrides: any config key as a dotted flag, e.g. --train.learning_rate=3e-4.
    """
    from ds_distill.config.load import load_tree, parse_run, parse_students
    from ds_distill.train.loop import train_student, train_students

    tree = load_tree(config, recipe, overrides)
    resume, overwrite = resume_flag(resume), flag(overwrite, "overwrite")
    if "students" in tree:
        train_students(parse_students(tree), resume=resume, overwrite=overwrite)
    else:
        train_student(parse_run(tree), resume=resume, overwrite=overwrite)


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
    from ds_distill.train.scoring import described

    if dist.is_main():
        for name, stage in manifest["stages"].items():
            print(f"{name}: {stage['export']} ({described(stage['evaluation'])})")


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
    from functools import partial

    from ds_distill import models
    from ds_distill.config.load import load_config
    from ds_distill.data import tokenized as data
    from ds_distill.data import tokenizers

    run = load_config(config, recipe, overrides)
    if not run.data.tokenized_path:
        raise ConfigError(
            "set data.tokenized_path: the directory to write (one that every node of the launch can read)"
        )
    teacher = partial(models.teacher_weights, run.teacher)  # resolved where needed
    tokenizer = tokenizers.load_tokenizer(tokenizers.tokenizer_source(run, teacher))
    teacher_tokenizer = tokenizers.teacher_tokenizer(run, teacher)  # across tokenizers, the training rows hold both
    tokenized = data.tokenize(run.data, tokenizer, data.load_raw(run.data), teacher_tokenizer)
    tokenizers.check_unknown_tokens(run.data, tokenizer, tokenized[run.data.train_split])
    path = data.save_prepared(run.data, tokenizer, tokenized, teacher_tokenizer)
    print(f"wrote {', '.join(f'{split}: {len(rows):,} rows' for split, rows in tokenized.items())} to {path}")


def cache_teacher(
    config: str | None = None,
    recipe: str | None = None,
    output_dir: str | None = None,
    top_k: int = 64,
    dtype: str = "bfloat16",
    batch_size: int | None = None,
    shard_examples: int = 4096,
    overwrite: bool = False,
    **overrides,
):
    """Writes the teacher's top-k log-probabilities for every target token of a run's training split to disk.

        ds-distill cache_teacher --config=RUN.yaml --output_dir=/shared/cache_t5xl_k64
        deepspeed --num_gpus 8 --module ds_distill cache_teacher --config=RUN.yaml --output_dir=DIR
        ds-distill distill --config=RUN.yaml --teacher.cache=DIR      # then: KD from DIR, no teacher loaded

    Per target position: the k most likely ids (int32), their log-probabilities at the run's losses.kd.temperature
    (bf16) and the log of the probability left to all other ids (float32): 388 bytes per token at k = 64. The KD
    term then takes its divergence over the k ids plus one bucket for the rest (train/teacher_cache.py). Every
    rank writes shards of its own; a killed run, started again with the same command, writes only the missing
    shards. The cache records the teacher, tokenizer, data settings, training split and temperature it was
    written from, and runs from other ones are refused. Layer-wise terms (cka, hidden_mse, ...) need the online
    teacher. For a config with `students:`, the first student's KD temperature is cached.

    Args:
        config: path of the run YAML whose teacher, data and KD temperature to cache.
        recipe: name of a shipped recipe instead.
        output_dir: the cache directory (default: the config's teacher.cache); one every rank can write.
        top_k: ids kept per token (k = the vocabulary keeps the whole distribution).
        dtype: bfloat16 | float32, of the log-probabilities (float32: 516 bytes per token at k = 64).
        batch_size: examples per teacher forward (default: train.per_device_train_batch_size).
        shard_examples: examples per shard file (a killed run loses at most one shard per rank).
        overwrite: replace a cache written with other settings in output_dir.
        **overrides: dotted flags, e.g. --data.max_train_samples=100000.
    """
    from ds_distill.config.load import load_tree, parse_run, parse_students
    from ds_distill.train.cache_writer import CacheSettings, write_cache

    tree = load_tree(config, recipe, overrides)
    # students share the teacher and the data; the first one's KD temperature is cached
    run = next(iter(parse_students(tree).values())) if "students" in tree else parse_run(tree)
    output_dir = output_dir or run.teacher.cache
    if not output_dir:
        raise ConfigError("give --output_dir=DIR (or set teacher.cache in the config)")
    batch_size = batch_size or run.train.per_device_train_batch_size
    settings = CacheSettings(top_k=int(top_k), dtype=str(dtype), batch_size=int(batch_size),
                             shard_examples=int(shard_examples))  # fmt: skip
    write_cache(run, Path(output_dir), settings, overwrite=flag(overwrite, "overwrite"))


def generate_targets(
    config: str | None = None,
    recipe: str | None = None,
    output_dir: str | None = None,
    num_beams: int = 5,
    max_new_tokens: int | None = None,
    batch_size: int | None = None,
    shard_examples: int = 1024,
    overwrite: bool = False,
    **overrides,
):
    """Writes the teacher's outputs for a run's training sources as training data (sequence-level KD).

        ds-distill generate_targets --config=RUN.yaml --output_dir=/shared/targets_beam5
        deepspeed --num_gpus 8 --module ds_distill generate_targets --config=RUN.yaml --output_dir=DIR
        ds-distill distill --config=RUN.yaml --data.dataset=json --data.data_files.train=DIR/train.jsonl \\
            --data.data_files.validation=DIR/validation.jsonl --data.targets=teacher     # or both

    DIR/train.jsonl: the training examples as the data gives them, in its order, each with `teacher_target`, the
    teacher's beam-search output for its source (translation and seq2seq data); DIR/validation.jsonl: the
    validation split unchanged. With data.targets: teacher a run trains on the teacher's outputs (Kim & Rush
    2016), with both on each example twice (its reference, the teacher's). Every rank generates shards of its
    own (a ZeRO-3 teacher with the ranks in step); a killed run, started again with the same command, generates
    only the missing ones; DIR/targets.json records the teacher, data and settings.

    Args:
        config: path of the run YAML whose teacher and training data to use.
        recipe: name of a shipped recipe instead.
        output_dir: where to write (a directory every rank can write).
        num_beams: beam width (Kim & Rush: 5).
        max_new_tokens: the longest output (default: data.max_target_length).
        batch_size: sources per generate call (default: train.per_device_eval_batch_size).
        shard_examples: examples per shard (a killed run loses at most one shard per rank).
        overwrite: replace targets generated with other settings in output_dir.
        **overrides: dotted flags, e.g. --data.max_train_samples=100000.
    """
    from ds_distill.config.load import load_tree, parse_run, parse_students
    from ds_distill.train.generate_targets import GenerationSettings, write_targets

    if not output_dir:
        raise ConfigError("give --output_dir=DIR")
    tree = load_tree(config, recipe, overrides)
    run = next(iter(parse_students(tree).values())) if "students" in tree else parse_run(tree)
    settings = GenerationSettings(
        num_beams=int(num_beams),
        max_new_tokens=int(max_new_tokens or run.data.max_target_length),
        batch_size=int(batch_size or run.train.per_device_eval_batch_size),
        shard_examples=int(shard_examples),
    )
    write_targets(run, Path(output_dir), settings, overwrite=flag(overwrite, "overwrite"))
