"""Distillation throughput on one GPU: a Flan-T5-XL-shaped teacher (bf16) and the 145M recipe student.

    python bench/gpu_throughput.py [--work_dir=/tmp/gpu_throughput] [--batch_sizes=320,256,192] [--steps=10]
    python bench/gpu_throughput.py --torch_compile --compile_plain   # also the compiled toolkit and plain loops
    python bench/gpu_throughput.py --smoke        # the same pipeline at toy sizes on the CPU, to check the script

Random weights at Flan-T5-XL's shapes (2.85B parameters) and the `flan_t5_3b_145m` recipe's student (12+12
blocks, d_model 512), 128 source and 128 target tokens per example, no padding. For each teacher placement
(`teacher_replicated_bf16.json`: a bf16 copy on the GPU; `teacher_zero3_inference.json`: ZeRO-3 on the GPU;
`teacher_zero3_inference_cpu.json`: ZeRO-3 with parameters in pinned CPU memory) and each objective (`kd`:
CE + KD; `cka`: CE + KD + CKA on every mapped hidden state), the toolkit's own loop (`Trainer.train_steps`)
trains the student under ZeRO-2 in bf16. A plain PyTorch loop (teacher bf16 resident, the stock Hugging Face
modules, student fp32 weights under bf16 autocast, fused AdamW, one pre-tokenised batch) runs CE + KD at the
toolkit's batch as the reference. Each configuration runs in a process of its own, at the largest of
`--batch_sizes` that fits; `profile` (a subcommand) times one configuration's phases and writes
torch.profiler's kernel table.

Figures: tokens/s (source + target tokens), model FLOPs utilisation (teacher forward + student forward and
backward, counted by torch's FlopCounterMode on the real models; CKA's products count as overhead) against
the datasheet's dense bf16 rate and against a measured 8192^3 bf16 matmul, peak GPU memory, and how fast the
data pipeline delivers micro-batches. Also the cost of one CKA layer pair at the run's shapes in float32,
TF32 and float64. Results go to `work_dir/results.json` and, as a table, to stdout.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import fire
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ds_distill import models  # noqa: E402
from ds_distill.config.load import load_config  # noqa: E402
from ds_distill.config.run import FromTeacherConfig  # noqa: E402

RECIPE = "flan_t5_3b_145m"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU serves the --smoke check of this script
# --smoke: toy shapes, so the whole pipeline runs on a CPU in a minute or two
SMOKE_TEACHER = FromTeacherConfig(encoder_layers=2, decoder_layers=2, d_model=128, d_ff=256, num_heads=4)
SMOKE_STUDENT = FromTeacherConfig(encoder_layers=1, decoder_layers=1, d_model=64, d_ff=128, num_heads=2)
PLACEMENTS = {
    "replicated": "ds_configs/teacher_replicated_bf16.json",
    "zero3_gpu": "ds_configs/teacher_zero3_inference.json",
    "zero3_cpu_offload": "ds_configs/teacher_zero3_inference_cpu.json",
}
SEQUENCE_TOKENS = 128
TOKENIZER_PIECES = 8000  # the sentencepiece tokenizer the benchmark trains: the logit losses compare this many rows
OOM_EXIT = 3
# Dense bf16 tensor-core rates from NVIDIA's datasheets (SXM parts), TFLOP/s.
DATASHEET_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def student_dims(smoke: bool) -> FromTeacherConfig:
    return SMOKE_STUDENT if smoke else load_config(recipe=RECIPE).student.init.from_teacher


def teacher_config(smoke: bool):
    config = models.load_config("google/flan-t5-xl", "teacher")
    return models.adapter_for(config).shrink(config, SMOKE_TEACHER) if smoke else config


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def reset_peak_memory() -> float:
    """Frees what can be freed, restarts the peak; returns the memory still allocated (GB)."""
    gc.collect()
    if DEVICE != "cuda":
        return 0.0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated() / 2**30


def peak_memory_gb() -> float:
    if DEVICE == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# -- assets: tokenizer and full-length text (made where ../shared is, carried to the GPU machine) ---------------
def make_assets(assets: Path, data: Path, examples: int = 1024) -> None:
    """A sentencepiece tokenizer and `train.jsonl` of translation pairs whose both sides tokenise to at least
    128 tokens (consecutive sentences joined), so truncation leaves every example exactly 128 + 128 tokens."""
    from ds_distill.data.tokenizers import train_sentencepiece_tokenizer

    if (assets / "train.jsonl").is_file():
        return
    pieces = TOKENIZER_PIECES
    tokenizer = train_sentencepiece_tokenizer(data / "train.jsonl", ("en", "de"), assets / "tokenizer", pieces)
    pairs = [json.loads(line)["translation"] for line in open(data / "train.jsonl")]
    rows, source, target = [], [], []
    for pair in pairs * 4:
        source.append(pair["en"])
        target.append(pair["de"])
        joined = {"en": " ".join(source), "de": " ".join(target)}
        if min(len(tokenizer(joined[lang])["input_ids"]) for lang in joined) > SEQUENCE_TOKENS:
            rows.append(json.dumps({"translation": joined}))
            source, target = [], []
        if len(rows) == examples:
            break
    (assets / "train.jsonl").write_text("\n".join(rows) + "\n")


def make_teacher(assets: Path, smoke: bool) -> dict[str, float]:
    """Saves a random Flan-T5-XL-shaped teacher in bf16 beside the tokenizer (built on the device: seconds, where
    initialising 2.85B parameters on a CPU takes minutes); returns the model FLOPs per example."""
    from transformers import AutoTokenizer

    config = teacher_config(smoke)
    adapter = models.adapter_for(config)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        teacher = adapter.from_config(config).to(torch.bfloat16).eval()
    target = assets / "teacher"
    if not target.is_dir():
        staging = assets / "teacher.partial"
        teacher.save_pretrained(staging)
        AutoTokenizer.from_pretrained(assets / "tokenizer").save_pretrained(staging)
        staging.rename(target)
    student_config = adapter.shrink(config, student_dims(smoke))
    with torch.device(DEVICE):
        student = adapter.from_config(student_config).to(torch.bfloat16)
    flops = count_flops(teacher, student)
    flops["teacher_parameters"] = models.count_parameters(config)
    flops["student_parameters"] = models.count_parameters(student_config)
    del teacher, student
    reset_peak_memory()
    return flops


def count_flops(teacher, student, batch: int = 2) -> dict[str, float]:
    """Matmul FLOPs per example: teacher forward, student forward + backward (FlopCounterMode, real shapes)."""
    from torch.utils.flop_counter import FlopCounterMode

    ids = torch.randint(3, 8000, (batch, SEQUENCE_TOKENS), device=DEVICE)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "decoder_input_ids": ids}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        teacher(**inputs)
    teacher_flops = counter.get_total_flops() / batch
    with FlopCounterMode(display=False) as counter:
        student(**inputs).logits.float().sum().backward()
    student_flops = counter.get_total_flops() / batch
    return {"teacher_forward": teacher_flops, "student_forward_backward": student_flops}


# -- ceilings and the CKA pair cost ------------------------------------------------------------------------
def median_ms(function, repeats: int = 10, warmup: int = 3) -> float:
    """Median time of `function` in milliseconds, synchronised with the device around each call."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        synchronize()
        started = time.perf_counter()
        function()
        synchronize()
        times.append(1000 * (time.perf_counter() - started))
    return sorted(times)[len(times) // 2]


def matmul_tflops(size: int = 8192) -> float:
    a, b = (torch.randn(size, size, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    return 2 * size**3 / median_ms(lambda: a @ b) / 1e9


def cka_pair_cost(tokens: int, student_width: int = 512, teacher_width: int = 2048) -> dict[str, dict[str, float]]:
    """Forward + backward of one CKA layer pair at the run's shapes (bf16 hidden states, as captured)."""
    from ds_distill.objectives.hidden import cka_loss

    student = torch.randn(tokens, student_width, device=DEVICE).to(torch.bfloat16).requires_grad_(True)
    mixing = torch.randn(student_width, teacher_width, device=DEVICE)
    teacher = (student.detach().float() @ mixing + torch.randn(tokens, teacher_width, device=DEVICE)).to(torch.bfloat16)
    reference = cka_loss(student.detach(), teacher, dtype=torch.float64).item()
    results = {}
    for name, dtype, tf32 in (
        ("float32", torch.float32, False),
        ("tf32", torch.float32, True),
        ("float64", torch.float64, False),
    ):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        value = cka_loss(student, teacher, dtype=dtype).item()
        milliseconds = median_ms(lambda dtype=dtype: cka_loss(student, teacher, dtype=dtype).backward())
        results[name] = {"ms": milliseconds, "value": value, "error": abs(value - reference)}
    torch.backends.cuda.matmul.allow_tf32 = False
    return results


# -- one toolkit configuration (child process) -------------------------------------------------------------
def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def toolkit_run_config(
    assets: Path, work_dir: Path, placement: str, method: str, batch: int, steps: int, smoke: bool, compile: bool
):
    overrides = {"student.init.from_teacher": vars(SMOKE_STUDENT)} if smoke else {}
    return load_config(
        recipe=RECIPE,
        overrides={
            **overrides,
            "method": method,
            "teacher.model_name_or_path": str(assets / "teacher"),
            "teacher.deepspeed_config": PLACEMENTS[placement],
            "data.dataset": "json",
            "data.dataset_config_name": None,
            "data.data_files": {"train": str(assets / "train.jsonl")},
            "data.validation_split": None,
            "data.source_lang": "en",
            "data.target_lang": "de",
            "data.prefix": "",
            "train.output_dir": str(work_dir / f"{placement}_{method}_{batch}{'_compiled' if compile else ''}"),
            "train.per_device_train_batch_size": batch,
            "train.max_steps": 100000,
            "train.warmup_steps": 0,
            "train.logging_steps": steps,
            "train.eval_steps": 0,
            "train.save_steps": 0,
            "train.bf16": True,
            "train.torch_compile": compile,
        },
    )


def _names(value) -> list[str]:
    """fire reads `a,b` as a tuple and `a` as a string."""
    return list(value) if isinstance(value, (tuple, list)) else str(value).split(",")


def build_trainer(
    assets: Path,
    work_dir: Path,
    placement: str,
    method: str,
    batch: int,
    steps: int,
    smoke: bool,
    compile: bool,
    teacher,
):
    from ds_distill.train.loop import Trainer
    from ds_distill.train.prepare import prepare

    run = toolkit_run_config(assets, work_dir, placement, method, batch, steps, smoke, compile)
    return Trainer(prepare(run, overwrite=True), teacher=teacher)


def release(trainer) -> None:
    """Frees the student engine; the teacher engine stays for the next method, without this run's hooks."""
    trainer.progress.close()
    if trainer.teacher_side is not None:
        trainer.teacher_side.capture.remove()
    trainer.engine.destroy()


def toolkit(
    assets,
    work_dir,
    placement,
    methods,
    batch: int,
    steps: int,
    warmup: int,
    result,
    smoke: bool = False,
    compile: bool = False,
):
    """Times the toolkit's loop for each method on one teacher engine; appends JSON lines to `result`."""
    from ds_distill import dist

    dist.init()
    assets, work_dir = Path(assets), Path(work_dir)
    teacher = None
    for method in _names(methods):
        kind = "toolkit, torch.compile" if compile else "toolkit"
        record = {"kind": kind, "placement": placement, "method": method, "batch": batch}
        try:
            record["memory_before_gb"] = reset_peak_memory()
            started = time.perf_counter()
            trainer = build_trainer(assets, work_dir, placement, method, batch, steps, smoke, compile, teacher)
            teacher = trainer.teacher
            record["setup_s"] = time.perf_counter() - started
            trainer.begin()
            trainer.train_steps(until=warmup)
            synchronize()
            started = time.perf_counter()
            trainer.train_steps(until=warmup + steps)
            synchronize()
            seconds = time.perf_counter() - started
            started = time.perf_counter()
            for _ in range(steps):
                next(trainer.stream)
            record["data_ms_per_batch"] = 1000 * (time.perf_counter() - started) / steps
            log = [json.loads(line) for line in open(trainer.p.output_dir / "log.jsonl")]
            record.update(
                step_s=seconds / steps,
                tokens_per_s=batch * 2 * SEQUENCE_TOKENS * steps / seconds,
                peak_memory_gb=peak_memory_gb(),
                loss=log[-1]["loss"],
                terms={k: v for k, v in log[-1].items() if k.startswith("loss/")},
            )
            release(trainer)
            del trainer
        except Exception as error:  # an OOM ends this process; the parent retries with a smaller batch
            _fail(record, error, result)
        _write(record, result)


def _write(record: dict, result) -> None:
    with open(result, "a") as out:
        out.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


def _fail(record: dict, error: BaseException, result) -> None:
    record["error"] = "out of memory" if _is_oom(error) else f"{type(error).__name__}: {error}"
    _write(record, result)
    raise SystemExit(OOM_EXIT if _is_oom(error) else 1) from error


def profile(assets, work_dir, placement, method, batch: int, steps: int, warmup: int, result, smoke: bool = False):
    """Where a toolkit step's time goes: each phase timed apart (synchronised), then torch.profiler's kernel
    table over two steps, written beside the results."""
    from collections import defaultdict

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from ds_distill import dist

    dist.init()
    record = {"kind": "profile", "placement": placement, "method": method, "batch": batch}
    try:
        trainer = build_trainer(Path(assets), Path(work_dir), placement, method, batch, steps, smoke, False, None)
        trainer.begin()
        trainer.train_steps(until=warmup)
        phases = defaultdict(list)
        for _ in range(steps):
            synchronize()
            marks = [time.perf_counter()]
            batch_on_host = next(trainer.stream)
            marks.append(time.perf_counter())
            step_tokens = trainer.step_tokens([batch_on_host])
            batch_on_device = trainer.to_device(batch_on_host)
            teacher_features = trainer.teacher_features(batch_on_device)
            synchronize()
            marks.append(time.perf_counter())
            total, _ = trainer.engine(batch_on_device, teacher_features, step_tokens)
            synchronize()
            marks.append(time.perf_counter())
            trainer.engine.backward(total, scale_wrt_gas=False)
            synchronize()
            marks.append(time.perf_counter())
            trainer.engine.step()
            synchronize()
            marks.append(time.perf_counter())
            del teacher_features, total
            names = ("data", "teacher_forward", "student_forward_and_losses", "backward", "optimizer_step")
            for name, begin, end in zip(names, marks, marks[1:]):
                phases[name].append(1000 * (end - begin))
        record["phase_ms"] = {name: sorted(times)[len(times) // 2] for name, times in phases.items()}
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
        with torch_profile(activities=activities) as profiler:
            trainer.train_steps(until=trainer.step + 2)
            synchronize()
        sort = "self_cuda_time_total" if DEVICE == "cuda" else "self_cpu_time_total"
        table = profiler.key_averages().table(sort_by=sort, row_limit=45, max_name_column_width=70)
        path = Path(work_dir) / f"profile_{placement}_{method}_{batch}.txt"
        path.write_text(table)
        record["profile_table"] = str(path)
    except Exception as error:
        _fail(record, error, result)
    _write(record, result)


# -- the plain PyTorch reference (child process) -----------------------------------------------------------
def stock_modules(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face modules' own forwards, as a hand-written loop has them (undoes `use_fused_kernels`)."""
    for module in model.modules():
        module.__dict__.pop("forward", None)
    return model


def plain(assets, batch: int, steps: int, warmup: int, result, smoke: bool = False, compile: bool = False):
    """CE + forward KL in a hand-written loop: teacher bf16 resident, student fp32 under bf16 autocast, the
    stock Hugging Face modules; with `compile`, both models through torch.compile."""
    from transformers import AutoTokenizer

    assets = Path(assets)
    kind = "plain, torch.compile" if compile else "plain"
    record = {"kind": kind, "placement": "resident", "method": "kd", "batch": batch}
    try:
        config = teacher_config(smoke)
        adapter = models.adapter_for(config)
        teacher = stock_modules(adapter.from_pretrained(assets / "teacher", dtype=torch.bfloat16)).to(DEVICE)
        teacher.eval().requires_grad_(False)
        torch.manual_seed(0)
        student = stock_modules(adapter.from_config(adapter.shrink(config, student_dims(smoke)))).to(DEVICE)
        optimizer = torch.optim.AdamW(student.parameters(), lr=3e-4, fused=DEVICE == "cuda")
        tokenizer = AutoTokenizer.from_pretrained(assets / "tokenizer")
        pairs = [json.loads(line)["translation"] for line in open(assets / "train.jsonl")][:batch]
        pairs = (pairs * -(-batch // len(pairs)))[:batch]
        encode = {"max_length": SEQUENCE_TOKENS, "truncation": True, "return_tensors": "pt"}
        inputs = tokenizer([p["en"] for p in pairs], **encode).to(DEVICE)
        labels = tokenizer(text_target=[p["de"] for p in pairs], **encode)["input_ids"].to(DEVICE)
        inputs["decoder_input_ids"] = student.prepare_decoder_input_ids_from_labels(labels=labels)
        if compile:
            teacher, student = torch.compile(teacher), torch.compile(student)

        def step():
            with torch.no_grad():
                teacher_logits = teacher(**inputs, use_cache=False).logits
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                logits = student(**inputs, use_cache=False).logits
            logits = logits.float()
            ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
            log_student = F.log_softmax(logits, -1)
            log_teacher = F.log_softmax(teacher_logits.float(), -1)
            kd = (log_teacher.exp() * (log_teacher - log_student)).sum(-1).mean()
            (ce + kd).backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return ce + kd

        for _ in range(warmup):
            step()
        synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            loss = step()
        synchronize()
        seconds = time.perf_counter() - started
        record.update(
            step_s=seconds / steps,
            tokens_per_s=batch * 2 * SEQUENCE_TOKENS * steps / seconds,
            peak_memory_gb=peak_memory_gb(),
            loss=loss.item(),
        )
    except Exception as error:
        _fail(record, error, result)
    _write(record, result)


# -- the parent --------------------------------------------------------------------------------------------
def _child(args: list[str], log: Path, timeout: int) -> int:
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "TOKENIZERS_PARALLELISM": "false"}
    if DEVICE == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    with open(log, "a") as out:
        try:
            return subprocess.run(
                [sys.executable, __file__, *args], env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            out.write(f"\ntimed out after {timeout} s\n")
            return 124


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path)] if path.is_file() else []


def main(
    work_dir: str = "/tmp/gpu_throughput",
    data: str = str(REPO.parent / "shared" / "data" / "wmt_ende_10k"),
    assets: str | None = None,
    batch_sizes: str = "256,192,128,64",
    steps: int = 10,
    warmup: int = 3,
    placements: str = ",".join(PLACEMENTS),
    child_timeout: int = 300,
    plain_loop: bool = True,
    compile_plain: bool = False,
    torch_compile: bool = False,
    smoke: bool = False,
):
    """Builds the assets and the teacher, then times every configuration in its own process (see the module doc).

    Args:
        work_dir: teacher weights (5.7 GB), run directories, logs and results.json.
        data: the shared WMT sample, read to make the tokenizer and the full-length text.
        assets: a directory of tokenizer + train.jsonl made earlier (default: work_dir/assets, made here).
        batch_sizes: micro-batch sizes to try, largest first; a configuration runs at the largest that fits.
        steps: timed optimizer steps per configuration, after `warmup` untimed ones.
        placements: which teacher placements to time (replicated, zero3_gpu, zero3_cpu_offload).
        child_timeout: seconds before a configuration's process is stopped.
        plain_loop: time the plain loop at the largest batch the replicated teacher fitted.
        compile_plain: also time the plain loop with both models through torch.compile (minutes of compiling).
        torch_compile: time the toolkit with `train.torch_compile` (ZeRO-3 placements then run their teacher eagerly).
        smoke: toy shapes, batch 2, 2 steps: checks the whole script on a CPU in a minute or two.
    """
    if smoke:
        batch_sizes, steps, warmup = "2", 2, 1
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    assets_dir = Path(assets) if assets else work / "assets"
    make_assets(assets_dir, Path(data))
    results = work / "results.jsonl"
    results.unlink(missing_ok=True)
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (smoke check)"
    summary = {"gpu": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    summary["matmul_bf16_tflops"] = matmul_tflops(8192 if DEVICE == "cuda" else 1024)
    summary["datasheet_bf16_tflops"] = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None)
    summary["flops_per_example"] = make_teacher(assets_dir, smoke)
    print(json.dumps(summary), flush=True)

    sizes = [int(b) for b in _names(batch_sizes)]
    common = [f"--assets={assets_dir}", f"--steps={steps}", f"--warmup={warmup}", f"--result={results}"]
    common += ["--smoke"] if smoke else []
    log = work / "children.log"
    for placement in _names(placements):
        pending = ["kd", "cka"]
        for batch in sizes:
            args = ["toolkit", f"--work_dir={work}", f"--placement={placement}", f"--methods={','.join(pending)}"]
            args += ["--compile"] if torch_compile else []
            code = _child(args + [f"--batch={batch}", *common], log, child_timeout)
            done = {
                r["method"]
                for r in _records(results)
                if r["placement"] == placement and r["kind"].startswith("toolkit") and "error" not in r
            }
            pending = [m for m in pending if m not in done]
            if not pending or code not in (OOM_EXIT, 0):
                break
        if not pending:  # later placements start from the size that fitted
            sizes = sizes[sizes.index(batch) :]
    fitted = [r["batch"] for r in _records(results) if r["placement"] == "replicated" and "error" not in r]
    for batch in [b for b in sizes if plain_loop and (not fitted or b <= max(fitted))]:
        if _child(["plain", f"--batch={batch}", *common], log, child_timeout) != OOM_EXIT:
            if compile_plain:
                _child(["plain", f"--batch={batch}", "--compile", *common], log, child_timeout)
            break

    summary["cka_pair"] = cka_pair_cost(tokens=max(fitted or [sizes[-1]]) * SEQUENCE_TOKENS)
    rows = _records(results)
    flops = summary["flops_per_example"]
    per_example = flops["teacher_forward"] + flops["student_forward_backward"]
    for row in rows:
        if "error" not in row:
            achieved = per_example * row["batch"] / row["step_s"] / 1e12
            row["model_tflops"] = achieved
            row["mfu_measured_matmul"] = achieved / summary["matmul_bf16_tflops"]
            if summary["datasheet_bf16_tflops"]:
                row["mfu_datasheet"] = achieved / summary["datasheet_bf16_tflops"]
    summary["runs"] = rows
    (work / "results.json").write_text(json.dumps(summary, indent=2))
    print(table(summary))


def table(summary: dict) -> str:
    lines = [
        f"{summary['gpu']}, torch {summary['torch']}; matmul ceiling {summary['matmul_bf16_tflops']:.0f} TFLOP/s; "
        f"model FLOPs per example: teacher fwd {summary['flops_per_example']['teacher_forward'] / 1e12:.3f} T, "
        f"student fwd+bwd {summary['flops_per_example']['student_forward_backward'] / 1e12:.3f} T",
        "| loop | teacher | objective | batch | tokens/s | step ms | MFU (datasheet) | MFU (matmul) | peak GB | data ms |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in summary["runs"]:
        if "error" in row:
            lines.append(f"| {row['kind']} | {row['placement']} | {row['method']} | {row['batch']} | {row['error']} |")
            continue
        lines.append(
            f"| {row['kind']} | {row['placement']} | {row['method']} | {row['batch']} | {row['tokens_per_s']:,.0f} | "
            f"{1000 * row['step_s']:.0f} | {row.get('mfu_datasheet', float('nan')):.1%} | "
            f"{row['mfu_measured_matmul']:.1%} | {row['peak_memory_gb']:.1f} | {row.get('data_ms_per_batch', 0):.1f} |"
        )
    lines.append("CKA, one layer pair, forward + backward: " + ", ".join(
        f"{k} {v['ms']:.2f} ms (loss {v['value']:.6f}, off float64 by {v['error']:.1e})" for k, v in summary["cka_pair"].items()
    ))  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("toolkit", "plain", "profile"):  # one configuration, one process
        fire.Fire({"toolkit": toolkit, "plain": plain, "profile": profile})
    else:
        fire.Fire(main)
