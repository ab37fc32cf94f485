"""Verbs that run the job: `demo`, `distill`, `chain`, `prepare_data`."""

from __future__ import annotations

from pathlib import Path

from ds_distill.cli.args import flag
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

    A config with `students:` (a name per student, each overriding the run's sections key by key) trains them
    all on one teacher pass, each into train.output_dir/NAME (train/cohort.py).

    Args:
        config: path of a run YAML (method, teacher, student, data, layer_map, losses, train; students).
        recipe: name of a shipped recipe instead (`ds-distill list` shows them).
        resume: continue from the newest complete checkpoint in train.output_dir.
        overwrite: delete an earlier run in train.output_dir first.
        **overrides: any config key as a dotted flag, e.g. --train.learning_rate=3e-4.
    """
    from ds_distill.config.load import load_tree, parse_run, parse_students
    from ds_distill.train.cohort import distill_students
    from ds_distill.train.loop import distill as run_distill

    tree = load_tree(config, recipe, overrides)
    resume, overwrite = flag(resume, "resume"), flag(overwrite, "overwrite")
    if "students" in tree:
        distill_students(parse_students(tree), resume=resume, overwrite=overwrite)
    else:
        run_distill(parse_run(tree), resume=resume, overwrite=overwrite)


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
    from ds_distill.config.load import load_config
    from ds_distill.data import tokenized as data
    from ds_distill.data import tokenizers

    run = load_config(config, recipe, overrides)
    if not run.data.tokenized_path:
        raise ConfigError(
            "set data.tokenized_path: the directory to write (one that every node of the launch can read)"
        )
    tokenizer = tokenizers.load_tokenizer(tokenizers.tokenizer_source(run))
    tokenized = data.tokenize(run.data, tokenizer, data.load_raw(run.data))
    tokenizers.check_unknown_tokens(run.data, tokenizer, tokenized[run.data.train_split])
    path = data.save_prepared(run.data, tokenizer, tokenized)
    print(f"wrote {', '.join(f'{split}: {len(rows):,} rows' for split, rows in tokenized.items())} to {path}")
