"""Where the wall time of a tiny 2-rank run goes: the launcher, imports, the process group, data, engines, steps,
checkpoints, export and exit.

    python bench/launch_cost.py [--rounds=3] [--work_dir=/tmp/launch_cost]

The run is the tests' reference run (`tests/conftest.py` translation_config: the tiny T5 teacher under
`teacher_zero3_inference_cpu.json`, a 1+1-block student under `student_zero2.json`, 12 steps of micro-batch 4 x 2
accumulated, checkpoints every 4 steps, an evaluation and the export at the end), launched as a user launches it,
`deepspeed --num_gpus 2 ... distill --config=...`, with `torchrun --nproc_per_node 2`, and as one process. Each
rank runs `ds_distill.cli.main` itself, with a clock wrapped around the functions that make up the phases (nothing
else changes), and writes when each phase started and ended, counted from the moment the parent started the
command. Rounds alternate the three ways.
"""

from __future__ import annotations

import time

STARTED = time.time()  # before any import: the rank's interpreter start-up ends here

import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (phase, module, attribute): the function whose calls make up the phase; classes by "Class.method"
PHASES = (
    ("process group", "ds_distill.dist", "init"),
    ("checks and data (prepare)", "ds_distill.train.loop", "prepare_students"),
    ("  tokenized data", "ds_distill.data.tokenized", "load_tokenized"),
    ("teacher engine", "ds_distill.train.loop", "load_teacher"),
    ("student model", "ds_distill.train.student_run", "build_student"),
    ("student engine", "ds_distill.train.engines", "student_engine"),
    ("run files and first batches (begin)", "ds_distill.train.loop", "Trainer.begin"),
    ("steps", "ds_distill.train.loop", "Trainer.train_steps"),
    ("  evaluation", "ds_distill.train.student_run", "StudentRun.evaluate"),
    ("  checkpoints", "ds_distill.train.student_run", "StudentRun.save_checkpoint"),
    ("export", "ds_distill.train.student_run", "StudentRun.export"),
    ("engines closed", "ds_distill.train.loop", "Trainer.close"),
    ("process group closed", "ds_distill.dist", "shutdown"),
)
IMPORTS = ("torch", "deepspeed", "transformers", "datasets", "ds_distill.cli")


def timed(spans: dict, phase: str, function):
    def wrapper(*args, **kwargs):
        begin = time.time()
        try:
            return function(*args, **kwargs)
        finally:
            spans.setdefault(phase, []).append((begin, time.time()))

    return wrapper


def rank_main(config: str, out: str) -> None:
    """One rank: imports in order, then `ds-distill distill --config=CONFIG` with the phases timed."""
    import importlib

    marks = {"interpreter started": STARTED}
    for name in IMPORTS:
        importlib.import_module(name)
        marks[f"import {name}"] = time.time()
    spans: dict[str, list] = {}
    for phase, module_name, attribute in PHASES:
        owner = importlib.import_module(module_name)
        *classes, function = attribute.split(".")
        for name in classes:
            owner = getattr(owner, name)
        setattr(owner, function, timed(spans, phase, getattr(owner, function)))
    from ds_distill import cli

    cli.main(["distill", f"--config={config}"])
    marks["main returned"] = time.time()
    rank = os.environ.get("RANK", "0")
    Path(f"{out}.rank{rank}.json").write_text(json.dumps({"marks": marks, "spans": spans}))


LAUNCHERS = ("deepspeed", "torchrun", "python")
"""`deepspeed --num_gpus 2`, `torchrun --nproc_per_node 2`, and one process without a launcher."""


def run_once(config: Path, out: Path, launcher: str) -> dict:
    """Launches the run; returns rank 0's record, counted from the launch, with the whole wall time."""
    from tests.distributed.launch import free_port

    script = [str(Path(__file__).resolve()), "rank", str(config), str(out)]
    port = str(free_port())
    command = {
        "deepspeed": ["deepspeed", "--num_gpus", "2", "--master_port", port, *script],
        "torchrun": ["torchrun", "--nproc_per_node", "2", "--master_port", port, *script],
        "python": [sys.executable, *script],
    }[launcher]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    begin = time.time()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.time() - begin
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads(Path(f"{out}.rank0.json").read_text())
    return {"begin": begin, "wall": wall, **record}


def breakdown(record: dict) -> dict[str, float]:
    """Seconds per phase: interpreter and imports in order, each timed phase's total, and what is left."""
    begin, marks, spans = record["begin"], record["marks"], record["spans"]
    names = list(marks)
    out = {"launcher and interpreter start-up": marks[names[0]] - begin}
    for previous, name in zip(names[:-2], names[1:-1]):
        out[name] = marks[name] - marks[previous]
    for phase, *_ in PHASES:
        out[phase] = sum(end - start for start, end in spans.get(phase, []))
    timed_top = sum(out[phase] for phase, *_ in PHASES if not phase.startswith(" "))
    out["other work in main"] = marks["main returned"] - marks[f"import {IMPORTS[-1]}"] - timed_top
    out["interpreter exit and launcher end"] = begin + record["wall"] - marks["main returned"]
    out["whole"] = record["wall"]
    return out


def main(rounds: int = 3, work_dir: str = "/tmp/launch_cost") -> None:
    from tests import tiny_models
    from tests.conftest import translation_config, write_yaml

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "tiny" / "t5").is_dir():
        tokenizer = tiny_models.train_tokenizer(work / "tiny" / "tokenizer")
        tiny_models.build(work / "tiny", tokenizer)
    tiny = {"t5": work / "tiny" / "t5"}
    results: dict[str, list[dict]] = {launcher: [] for launcher in LAUNCHERS}
    for round_index in range(rounds):
        for launcher in LAUNCHERS:
            name = f"{launcher}_round{round_index}"
            config = write_yaml(work / f"{name}.yaml", translation_config(tiny, work / name))
            results[launcher].append(breakdown(run_once(config, work / name, launcher)))
            print(f"{name}: {results[launcher][-1]['whole']:.1f} s", flush=True)
    print("\n| phase | deepspeed, 2 ranks (s) | torchrun, 2 ranks (s) | one process (s) |\n|---|---:|---:|---:|")
    for phase in results[LAUNCHERS[0]][0]:
        cells = []
        for launcher in LAUNCHERS:
            values = [row[phase] for row in results[launcher]]
            spread = f" +- {statistics.stdev(values):.2f}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(values):.2f}{spread}")
        print(f"| {phase} | {' | '.join(cells)} |")
    (work / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    args = [arg for arg in sys.argv[1:] if not arg.startswith("--local_rank")]
    if args and args[0] == "rank":
        rank_main(*args[1:])
    else:
        import fire

        fire.Fire(main)
