"""`ds-distill plan`: memory per GPU and node before a launch."""

from __future__ import annotations

import sys
from pathlib import Path

from ds_distill.errors import ConfigError


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
    10-20 s). A chain config (`stages:`) is planned stage by stage; one with `students:` as one teacher with
    all the students (their states added up, the largest of their steps). Measured against H100 peaks: within 0.6%,
    with the logit terms before they were chunked (bench/RESULTS.md).

    Args:
        config: path of a run YAML (or --recipe=NAME).
        recipe: name of a shipped recipe (`ds-distill list`).
        gpus_per_node: GPUs (ranks) per node (default 1).
        nodes: number of nodes (default 1).
        gpu_memory_gb: memory of one GPU (default 80, an H100's), e.g. 141 for an H200, 40 or 80 for an A100.
        cpu_memory_gb: host memory per node; default this machine's (said at the top of the report), which may
            not be the training nodes'.
        **overrides: dotted run settings, e.g. --train.per_device_train_batch_size=64.
    """
    from ds_distill import planner
    from ds_distill.config.load import load_tree, parse_run, parse_students

    hardware = planner.Hardware(
        gpus_per_node, nodes, gpu_memory_gb, planner.host_memory_gb() if cpu_memory_gb is None else cpu_memory_gb
    )
    if cpu_memory_gb is None:
        print(f"host memory per node: {hardware.cpu_memory_gb:,.0f} GB, this machine's (give --cpu_memory_gb for the "
              "training nodes')", file=sys.stderr)  # fmt: skip
    print("tracing one training step on the CPU at the run's shapes ...", file=sys.stderr)
    if not _is_chain(config, recipe):
        tree = load_tree(config, recipe, overrides)
        if "students" in tree:
            runs = parse_students(tree)
            plan = planner.make_students_plan(runs, hardware, planner.tokenizer_size(next(iter(runs.values()))))
        else:
            run = parse_run(tree)
            plan = planner.make_plan(run, hardware, planner.tokenizer_size(run))
        print(planner.report(plan))
        return
    from ds_distill import chain

    vocab = None
    for name, run, teacher_config, student_config, _ in chain.planned_stages(chain.load(config, recipe, overrides)):
        vocab = vocab or planner.tokenizer_size(run)  # the first stage's teacher has it; later stages share it
        stage = planner.make_plan(run, hardware, vocab, configs=(teacher_config, student_config))
        stage.flag_prefix = "defaults."  # for every stage; a stage's own section in the YAML overrides them
        print(f"stage {name}:\n{planner.report(stage)}\n")


def _is_chain(config: str | None, recipe: str | None) -> bool:
    from ds_distill import chain
    from ds_distill.config.load import read_tree, recipe_path

    if bool(config) == bool(recipe):
        raise ConfigError("give --config=RUN.yaml or --recipe=NAME")
    return chain.is_chain(read_tree(Path(config) if config else recipe_path(recipe)))
