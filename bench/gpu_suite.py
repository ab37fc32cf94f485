"""Every GPU measurement the project owes, in one command that fits a lent GPU's 8 minutes (one H100 or H200).

    python bench/gpu_suite.py prepare                  # here, where PyPI and ../shared are: assets and wheels
    python bench/gpu_suite.py run --out=DIR            # on the GPU machine: figures to DIR/results.{json,md}
    python bench/gpu_suite.py run --dry_run            # every part at tiny shapes on the CPU (a test runs it)

On a GPU machine without a package index, after `prepare` here: copy `.bench_assets/gpu_suite` and `.whl` there
beside the checkout, and run from its root

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
        PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 bench/gpu_suite.py run --out=$OUT

What it measures (the children of bench/gpu_throughput.py, a process per teacher placement, at the largest of
`--batch_sizes` that fits): a Flan-T5-XL-shaped teacher (random bf16 weights, 2.85B) distilling the 145M recipe
student under ZeRO-2 in bf16, 128 + 128 tokens per example, in the toolkit's own loop:

1. teacher replicated in bf16: CE + KD, CE + KD + CKA; a run from the teacher cache (k = 64, written first,
   timed); two students (CE + KD, CE + KD + CKA) on one teacher pass;
2. teacher under ZeRO-3 on the GPU, and under ZeRO-3 offloaded to CPU memory: CE + KD;
3. the same CE + KD step in a hand-written loop, both models through torch.compile;
4. CE + KD under `train.torch_compile`, and a profile of that step (phases, torch.profiler's kernel table);
5. `ds-distill plan`'s predicted peak for every CE + KD and CE + KD + CKA row.

Each row: tokens/s, ms per step, MFU against the datasheet's dense bf16 rate and against an 8192^3 bf16 matmul
measured in the same run, peak GPU memory. Parts run in that order within `--budget_s`; a part whose estimate
no longer fits is recorded as skipped (`--parts` runs chosen ones in a later session). The dry run exercises
the same code at toy shapes (compiled parts run dynamo's graphs eagerly: no kernel builds on the CPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import fire

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import gpu_throughput as measure  # noqa: E402

ASSETS = REPO / ".bench_assets" / "gpu_suite"
WHEELS = REPO / ".whl"
CARRIED = {  # what the GPU machines' image lacked when last read (it has torch, transformers and the rest), at the
    # versions tested here
    "deepspeed": "0.19.8", "datasets": "5.2.0", "fire": "0.7.1", "termcolor": "3.3.0", "hjson": "3.1.0",
    "pydantic": "2.13.4", "pydantic_core": "2.46.4", "annotated-types": "0.7.0", "typing-inspection": "0.4.2",
    "dill": "0.4.1", "multiprocess": "0.70.19",
}  # fmt: skip


@dataclass(frozen=True)
class Part:
    """One child process: a teacher placement's toolkit measurements, or the plain loop, each with the seconds
    it is estimated to take on one H100 (a measurement starts only while it fits the budget)."""

    name: str
    child: str  # "toolkit" | "plain"
    placement: str
    estimates: dict[str, float]


START_S = 25.0
"""A child's start on the GPU machine: interpreter, imports, the 5.7 GB teacher read from the page cache."""
PARTS = (  # estimates: guesses until a first GPU run records each part's seconds (results.json, part_seconds)
    Part("replicated", "toolkit", "replicated", {"kd": 20, "cka": 25, "cache": 35, "students": 35}),
    Part("zero3_gpu", "toolkit", "zero3_gpu", {"kd": 25}),
    Part("zero3_cpu_offload", "toolkit", "zero3_cpu_offload", {"kd": 30}),
    Part("plain_compiled", "plain", "resident", {"kd": 120}),
    Part("toolkit_compiled", "toolkit", "replicated", {"kd_compiled": 150}),
)


def prepare(data: str = str(REPO.parent / "shared" / "data" / "wmt_ende_10k"), wheels: bool = True) -> None:
    """Here, before a GPU is lent: the benchmark's tokenizer and full-length text into .bench_assets/gpu_suite,
    and wheels of the packages the GPU image lacks into .whl (both ignored by git; the device call carries them)."""
    measure.make_assets(ASSETS, Path(data))
    if wheels:
        WHEELS.mkdir(exist_ok=True)
        platform = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:"]
        for tag in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"):
            platform += ["--platform", tag]
        for name, version in CARRIED.items():
            if name == "deepspeed":  # an sdist only: built here into a pure-Python wheel (its ops build on use)
                command = ["wheel", "--no-deps", "--no-build-isolation", "-w", str(WHEELS)]
            else:
                command = ["download", "--no-deps", *platform, "-d", str(WHEELS)]
            subprocess.run([sys.executable, "-m", "pip", "-q", *command, f"{name}=={version}"], check=True)
    print(f"assets in {ASSETS}, wheels in {WHEELS}; on the GPU machine carry both and run:\n"
          "python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && "
          "PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 bench/gpu_suite.py run --out=$OUT")  # fmt: skip


def _child(args: list[str], log: Path, timeout: float) -> int:
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "TOKENIZERS_PARALLELISM": "false"}
    if measure.DEVICE == "cpu":
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    with open(log, "a") as out:
        try:
            return subprocess.run([sys.executable, measure.__file__, *args], env=env, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=max(timeout, 1)).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            out.write(f"\ntimed out after {timeout:.0f} s\n")
            return 124


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path)] if path.is_file() else []


def run_part(part: Part, sizes: list[int], common: list[str], work: Path, results: Path, deadline: float) -> list[int]:
    """Runs a part at the largest batch that fits, going down `sizes` on out-of-memory; returns the sizes left
    to try (later parts start from the one that fitted)."""
    pending = list(part.estimates)
    for batch in sizes:
        args = [part.child, f"--part={part.name}", f"--batch={batch}", f"--deadline={deadline}", *common]
        if part.child == "plain":
            args.append("--compile")
        else:
            estimates = ",".join(f"{m}={part.estimates[m]}" for m in pending)
            args += [f"--work_dir={work}", f"--placement={part.placement}", f"--methods={','.join(pending)}",
                     f"--estimates={estimates}"]  # fmt: skip
        code = _child(args, work / "children.log", deadline - time.time())
        rows = [r for r in _records(results) if r["part"] == part.name]
        pending = [m for m in pending if m not in {r["method"] for r in rows if "error" not in r}]
        if not pending or code != measure.OOM_EXIT:
            with open(results, "a") as out:  # a child that died of something else: named, not lost
                for method in [m for m in pending if m not in {r["method"] for r in rows}]:
                    failed = {"part": part.name, "kind": part.child, "placement": part.placement, "method": method,
                              "batch": batch, "error": f"the child exited with {code} (children.log)"}  # fmt: skip
                    out.write(json.dumps(failed) + "\n")
            return sizes[sizes.index(batch) :]
    return sizes[-1:]


def run(out: str | None = None, work_dir: str = "/tmp/gpu_suite", assets: str = str(ASSETS),
        batch_sizes: str = "320,256,192", steps: int = 5, warmup: int = 2, budget_s: float = 450,
        parts: str = ",".join(p.name for p in PARTS), dry_run: bool = False) -> None:  # fmt: skip
    """Runs the parts in order within `budget_s`; writes results.json and results.md to `out` (default work_dir).

    Args:
        out: where the figures go (on the GPU machine: $OUT, which comes back).
        work_dir: teacher weights (5.7 GB), run directories, the children's log.
        assets: tokenizer and text made by `prepare`.
        batch_sizes: micro-batches to try, largest first.
        steps: timed optimizer steps per measurement, after `warmup` untimed ones.
        budget_s: the whole command's time; parts that no longer fit are skipped and named.
        parts: which parts to run (replicated, zero3_gpu, zero3_cpu_offload, plain_compiled, toolkit_compiled).
        dry_run: toy shapes on the CPU (no GPU needed): batch 2, 2 steps; checks that every part still runs.
    """
    started = time.time()
    if dry_run != (measure.DEVICE == "cpu"):
        raise SystemExit("--dry_run runs on the CPU and only there; a GPU run without it needs CUDA")
    if dry_run:
        batch_sizes, steps, warmup, budget_s = "2", 2, 1, float("inf")
    work, out_dir = Path(work_dir), Path(out or work_dir)
    work.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    assets_dir = Path(assets)
    if not (assets_dir / "train.jsonl").is_file():
        if not dry_run:
            raise SystemExit(f"no assets in {assets_dir}: run `python bench/gpu_suite.py prepare` where ../shared is")
        measure.make_assets(assets_dir, REPO.parent / "shared" / "data" / "wmt_ende_10k", examples=64)
    results = work / "results.jsonl"
    results.unlink(missing_ok=True)
    name = measure.torch.cuda.get_device_name() if not dry_run else "CPU (dry run)"
    summary = {"gpu": name, "torch": measure.torch.__version__, "date": time.strftime("%Y-%m-%d"),
               "matmul_bf16_tflops": measure.matmul_tflops(1024 if dry_run else 8192),
               "datasheet_bf16_tflops": next((v for k, v in measure.DATASHEET_BF16_TFLOPS.items() if k in name), None),
               "flops_per_example": measure.make_teacher(assets_dir, smoke=dry_run)}  # fmt: skip
    print(json.dumps(summary), flush=True)
    common = [f"--assets={assets_dir}", f"--steps={steps}", f"--warmup={warmup}", f"--result={results}"]
    common += ["--smoke"] if dry_run else []
    sizes, deadline, skipped = [int(b) for b in measure._names(batch_sizes)], started + budget_s, []
    summary.update(runs=[], part_seconds={}, skipped=skipped, cka_pair={})
    for part in (p for p in PARTS if p.name in measure._names(parts)):
        if time.time() + START_S + min(part.estimates.values()) > deadline:
            skipped.append(part.name)
            continue
        part_started = time.time()
        sizes = run_part(part, sizes, common, work, results, deadline)
        summary["part_seconds"][part.name] = round(time.time() - part_started, 1)
        report(summary, _records(results), started, work, out_dir)  # what a later failure cannot take back
    fitted = [r["batch"] for r in _records(results) if r.get("placement") == "replicated" and "step_s" in r]
    summary["cka_pair"] = measure.cka_pair_cost(tokens=max(fitted or sizes[-1:]) * measure.SEQUENCE_TOKENS)
    report(summary, _records(results), started, work, out_dir, plan=True)
    print(table(summary))


def report(summary: dict, rows: list[dict], started: float, work: Path, out_dir: Path, plan: bool = False) -> None:
    """Writes results.json and results.md (and the profile tables) to `out_dir` as they stand."""
    summary["skipped"] = sorted(
        set(summary["skipped"]) | {f"{r['part']}: {r['method']}" for r in rows if "skipped" in r}
    )
    add_figures(summary, rows, plan)
    summary.update(runs=rows, wall_s=round(time.time() - started, 1))
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "results.md").write_text(table(summary) + "\n")
    for path in work.glob("profile_*.txt"):
        (out_dir / path.name).write_text(path.read_text())


def add_figures(summary: dict, rows: list[dict], plan: bool) -> None:
    """MFU in both conventions for every timed row; with `plan`, `ds-distill plan`'s predicted peak for the
    CE + KD and CE + KD + CKA rows (the 145M recipe at the row's teacher placement and batch, one 80 GB GPU)."""
    from bench.plan_vs_measured import predicted_peak_gb

    flops = summary["flops_per_example"]
    for row in (r for r in rows if "step_s" in r):
        student = flops["student_forward_backward"] * (2 if row["method"] == "students" else 1)
        teacher = 0 if row["method"] == "cache" else flops["teacher_forward"]  # a cached run has no teacher
        achieved = (teacher + student) * row["batch"] / row["step_s"] / 1e12
        row["model_tflops"] = achieved
        row["mfu_measured_matmul"] = achieved / summary["matmul_bf16_tflops"]
        if summary["datasheet_bf16_tflops"]:
            row["mfu_datasheet"] = achieved / summary["datasheet_bf16_tflops"]
        if plan and row["kind"] == "toolkit" and row["method"] in ("kd", "cka"):  # the dry run plans the real shapes
            try:
                row["planned_peak_gb"] = predicted_peak_gb(row["method"], row["placement"], row["batch"])
            except Exception as error:  # noqa: BLE001 - the measured figures must not be lost to the plan
                row["plan_error"] = f"{type(error).__name__}: {error}"


def table(summary: dict) -> str:
    lines = [
        f"{summary['gpu']}, torch {summary['torch']}, {summary['date']}; bf16 matmul ceiling "
        f"{summary['matmul_bf16_tflops']:.0f} TFLOP/s; model FLOPs per example: teacher forward "
        f"{summary['flops_per_example']['teacher_forward'] / 1e12:.3f} T, student forward + backward "
        f"{summary['flops_per_example']['student_forward_backward'] / 1e12:.3f} T; {summary['wall_s']:.0f} s",
        "",
        "| loop | teacher | measurement | batch | tokens/s | ms/step | MFU (datasheet) | MFU (matmul) | peak GB | plan GB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in summary["runs"]:
        what = f"| {row['kind']} | {row['placement']} | {row['method']} | {row['batch']} |"
        if "step_s" not in row:
            lines.append(f"{what} {row.get('error') or 'skipped: ' + row.get('skipped', '')} | | | | | |")
            continue
        planned = f"{row['planned_peak_gb']:.1f}" if "planned_peak_gb" in row else ""
        datasheet = f"{row['mfu_datasheet']:.1%}" if "mfu_datasheet" in row else ""
        lines.append(
            f"{what} {row['tokens_per_s']:,.0f} | {1000 * row['step_s']:.0f} | {datasheet} | "
            f"{row['mfu_measured_matmul']:.1%} | {row['peak_memory_gb']:.1f} | {planned} |"
        )
    for row in summary["runs"]:
        if "cache_write_s" in row:
            lines.append(f"\nteacher cache: written in {row['cache_write_s']:.1f} s, "
                         f"{row['cache_bytes_per_token']:.0f} bytes per target token")  # fmt: skip
        if "phase_ms" in row:
            lines.append("compiled step, median ms per phase: " + ", ".join(
                f"{k} {v:.1f}" for k, v in row["phase_ms"].items()) + f"; kernel table in {row['profile_table']}")  # fmt: skip
    lines.append("CKA, one layer pair, forward + backward: " + ", ".join(
        f"{k} {v['ms']:.2f} ms (off float64 by {v['error']:.1e})" for k, v in summary["cka_pair"].items()))  # fmt: skip
    if summary["skipped"]:
        lines.append(f"skipped (time budget): {', '.join(summary['skipped'])}")
    lines.append("seconds per part: " + ", ".join(f"{k} {v:.0f}" for k, v in summary["part_seconds"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    fire.Fire({"prepare": prepare, "run": run})
