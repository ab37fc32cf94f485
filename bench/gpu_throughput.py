"""The measurements of bench/gpu_suite.py, each run in a child process of it (an out-of-memory error ends only
that process): a Flan-T5-XL-shaped teacher (random bf16 weights, 2.85B) and the 145M recipe student.

    python bench/gpu_throughput.py toolkit --placement=replicated --methods=kd,cka --batch=320 ...   (the suite's)
    python bench/gpu_throughput.py plain --batch=320 --compile ...

Random weights at Flan-T5-XL's shapes and the `flan_t5_3b_145m` recipe's student (12+12 blocks, d_model 512),
128 source and 128 target tokens per example, no padding. Teacher placements: `teacher_replicated_bf16.json`
(a bf16 copy on the GPU), `teacher_zero3_inference.json` (ZeRO-3 on the GPU), `teacher_zero3_inference_cpu.json`
(ZeRO-3 with parameters in pinned CPU memory). The toolkit's own loop (`Trainer.train_steps`) trains the student
under ZeRO-2 in bf16 (MEASUREMENTS lists what it times); the plain PyTorch loop (teacher bf16 resident, the stock
Hugging Face modules, student fp32 weights under bf16 autocast, fused AdamW, one pre-tokenised batch) runs
CE + KD at the toolkit's batch as the reference.

Figures: tokens/s (source + target tokens), step time and peak GPU memory per measurement; the suite adds model
FLOPs utilisation (teacher forward + student forward and backward, counted by torch's FlopCounterMode on the
real models; CKA's products count as overhead) against the datasheet's dense bf16 rate and a measured 8192^3
bf16 matmul, and the cost of one CKA layer pair at the run's shapes in float32, TF32 and float64.
"""

from __future__ import annotations

import gc
import json
import sys
import time
import traceback
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


# -- the toolkit's measurements (one child process per teacher placement) ----------------------------------
MEASUREMENTS = ("kd", "cka", "kd_compiled", "cache", "students")
"""What a placement's child can measure, in this order, on one teacher engine: the toolkit loop with CE + KD,
with CE + KD + CKA, CE + KD under train.torch_compile (then a profile of that step), a run from the teacher
cache (written first, timed), and two students (CE + KD and CE + KD + CKA) on one teacher pass."""


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def toolkit_tree(assets: Path, output_dir: Path, placement: str, method: str, batch: int, smoke: bool,
                 compile: bool = False, examples: int | None = None) -> dict:  # fmt: skip
    """The 145M recipe as a config tree, on the benchmark's teacher, text and batch."""
    from ds_distill.config.load import load_tree

    overrides = {"student.init.from_teacher": vars(SMOKE_STUDENT)} if smoke else {}
    return load_tree(
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
            "data.max_train_samples": examples,
            "data.tokenized_path": None,  # tokenized where each run is, not in the recipe's shared directory
            "train.output_dir": str(output_dir),
            "train.per_device_train_batch_size": batch,
            "train.max_steps": 100000,
            "train.warmup_steps": 0,
            "train.logging_steps": 1000,
            "train.eval_steps": 0,
            "train.save_steps": 0,
            "train.bf16": True,
            "train.torch_compile": compile,
        },
    )


def _names(value) -> list[str]:
    """fire reads `a,b` as a tuple and `a` as a string."""
    return list(value) if isinstance(value, (tuple, list)) else str(value).split(",")


def timed_steps(trainer, steps: int, warmup: int) -> float:
    """Seconds per optimizer step of a `Trainer` (one student or several) after `warmup`."""
    trainer.begin()
    trainer.train_steps(until=warmup)
    synchronize()
    started = time.perf_counter()
    trainer.train_steps(until=warmup + steps)
    synchronize()
    return (time.perf_counter() - started) / steps


def throughput(record: dict, step_s: float, batch: int, students: int = 1) -> dict:
    return {**record, "step_s": step_s, "tokens_per_s": students * batch * 2 * SEQUENCE_TOKENS / step_s,
            "peak_memory_gb": peak_memory_gb()}  # fmt: skip


def toolkit(assets, work_dir, placement, methods, batch: int, steps: int, warmup: int, result, smoke: bool = False,
            deadline: float = float("inf"), estimates: str = "", part: str = ""):  # fmt: skip
    """Runs `methods` (of MEASUREMENTS) on one teacher engine of `placement`; appends a JSON line per method to
    `result`, tagged with the suite's `part`. A method whose estimate (`name=seconds,...`) would pass `deadline`
    is recorded as skipped."""
    from ds_distill import dist

    dist.init()
    assets, work_dir, deadline = Path(assets), Path(work_dir), float(deadline)
    cost = {k: float(v) for k, v in (item.split("=") for item in _names(estimates) if item)}
    teacher = None
    for method in _names(methods):
        record = {"part": part, "kind": "toolkit", "placement": placement, "method": method, "batch": batch}
        if time.time() + cost.get(method, 0) > deadline:
            _write({**record, "skipped": "the suite's time budget"}, result)
            continue
        try:
            record["memory_before_gb"] = reset_peak_memory()
            run = MEASURE[method]
            row, teacher = run(assets, work_dir, placement, batch, steps, warmup, smoke, teacher, record)
        except Exception as error:  # an OOM ends this process (the parent goes on at a smaller batch); others are noted
            if _is_oom(error):
                _fail(record, error, result)
            traceback.print_exc()
            row = {**record, "error": f"{type(error).__name__}: {error}"}
        _write(row, result)


def _trainer(assets, work_dir, placement, method, batch, smoke, teacher, compile=False, examples=None, overrides=None):
    from ds_distill.config.load import merge, parse_run
    from ds_distill.train.loop import Trainer
    from ds_distill.train.prepare import prepare

    name = f"{placement}_{method}_{batch}{'_compiled' if compile else ''}"
    tree = toolkit_tree(assets, work_dir / name, placement, method, batch, smoke, compile, examples)
    tree = merge(tree, overrides or {})
    return Trainer(prepare(parse_run(tree), overwrite=True), teacher=teacher)


def measure_loop(assets, work_dir, placement, batch, steps, warmup, smoke, teacher, record):
    """CE + KD (`kd`) or CE + KD + CKA (`cka`) in the toolkit's loop."""
    started = time.perf_counter()
    trainer = _trainer(assets, work_dir, placement, record["method"], batch, smoke, teacher)
    record["setup_s"] = time.perf_counter() - started
    row = throughput(record, timed_steps(trainer, steps, warmup), batch)
    started = time.perf_counter()
    for _ in range(steps):
        next(trainer.stream)
    row["data_ms_per_batch"] = 1000 * (time.perf_counter() - started) / steps
    trainer.close()
    return row, trainer.teacher


def measure_compiled(assets, work_dir, placement, batch, steps, warmup, smoke, teacher, record):
    """CE + KD under train.torch_compile, then where that step's time goes: each phase timed apart
    (synchronised), and torch.profiler's kernel table over two steps, written beside the results."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    started = time.perf_counter()
    trainer = _trainer(assets, work_dir, placement, "kd", batch, smoke, teacher, compile=True)
    record["setup_s"] = time.perf_counter() - started
    row = throughput(record, timed_steps(trainer, steps, warmup), batch)
    row["phase_ms"] = phase_ms(trainer, steps)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with torch_profile(activities=activities) as profiler:
        trainer.train_steps(until=trainer.students[0].step + 2)
        synchronize()
    sort = "self_cuda_time_total" if DEVICE == "cuda" else "self_cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort, row_limit=45, max_name_column_width=70)
    path = Path(work_dir) / f"profile_compiled_{placement}_kd_{batch}.txt"
    path.write_text(table)
    row["profile_table"] = path.name
    trainer.close()
    return row, trainer.teacher


def phase_ms(trainer, steps: int) -> dict[str, float]:
    """Median milliseconds of each phase of a micro-step (the device synchronised between phases)."""
    from collections import defaultdict

    phases = defaultdict(list)
    names = ("data", "teacher_forward", "student_forward_and_losses", "backward", "optimizer_step")
    student = trainer.students[0]
    for _ in range(steps):
        synchronize()
        marks = [time.perf_counter()]
        on_host = next(trainer.stream)
        marks.append(time.perf_counter())
        step_tokens = student.step_tokens([on_host])
        on_device = trainer.to_device(on_host)
        teacher_features = trainer.teacher_features(on_device)
        synchronize()
        marks.append(time.perf_counter())
        total, _ = student.engine(on_device, teacher_features, step_tokens)
        synchronize()
        marks.append(time.perf_counter())
        student.engine.backward(total, scale_wrt_gas=False)
        synchronize()
        marks.append(time.perf_counter())
        student.engine.step()
        synchronize()
        marks.append(time.perf_counter())
        del teacher_features, total
        for name, begin, end in zip(names, marks, marks[1:]):
            phases[name].append(1000 * (end - begin))
    return {name: sorted(times)[len(times) // 2] for name, times in phases.items()}


def measure_cache(assets, work_dir, placement, batch, steps, warmup, smoke, teacher, record):
    """`cache_teacher` (k = 64, bf16) for the examples a run's first steps train on, timed; then that run from
    the cache (no teacher loaded), timed as `kd` is."""
    from ds_distill.config.load import parse_run
    from ds_distill.train.cache_writer import CacheSettings, write_cache

    examples = (warmup + steps + 1) * batch
    cache = Path(work_dir) / f"cache_{placement}_{batch}"
    tree = toolkit_tree(assets, Path(work_dir) / "cache_writer", placement, "kd", batch, smoke, examples=examples)
    settings = CacheSettings(top_k=64, dtype="bfloat16", batch_size=batch, shard_examples=examples)
    started = time.perf_counter()
    write_cache(parse_run(tree), cache, settings, overwrite=True)
    synchronize()
    record["cache_write_s"] = time.perf_counter() - started
    manifest = json.loads((cache / "cache.json").read_text())
    record["cache_bytes_per_token"] = manifest["bytes"] / max(manifest["target_tokens"], 1)
    reset_peak_memory()
    trainer = _trainer(assets, work_dir, placement, "kd", batch, smoke, None, examples=examples,
                       overrides={"teacher": {"cache": str(cache)}})  # fmt: skip
    row = throughput(record, timed_steps(trainer, steps, warmup), batch)
    trainer.close()
    return row, teacher


def measure_students(assets, work_dir, placement, batch, steps, warmup, smoke, teacher, record):
    """Two students (CE + KD, CE + KD + CKA) on one teacher pass; tokens/s counts both students' tokens."""
    from ds_distill.config.load import parse_students
    from ds_distill.train.loop import Trainer
    from ds_distill.train.prepare import prepare_students

    tree = toolkit_tree(assets, Path(work_dir) / f"students_{placement}_{batch}", placement, "kd", batch, smoke)
    tree["students"] = {"kd": {}, "cka": {"method": "cka"}}
    prepared = prepare_students(parse_students(tree), resume=False, overwrite=True)
    started = time.perf_counter()
    trainer = Trainer(prepared, teacher=teacher)
    record["setup_s"] = time.perf_counter() - started
    row = throughput(record, timed_steps(trainer, steps, warmup), batch, students=len(prepared))
    trainer.close()
    return row, trainer.teacher


MEASURE = {"kd": measure_loop, "cka": measure_loop, "kd_compiled": measure_compiled, "cache": measure_cache,
           "students": measure_students}  # fmt: skip


def _write(record: dict, result) -> None:
    with open(result, "a") as out:
        out.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


def _fail(record: dict, error: BaseException, result) -> None:
    record["error"] = "out of memory" if _is_oom(error) else f"{type(error).__name__}: {error}"
    _write(record, result)
    raise SystemExit(OOM_EXIT if _is_oom(error) else 1) from error


# -- the plain PyTorch reference (child process) -----------------------------------------------------------
def stock_modules(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face modules' own forwards, as a hand-written loop has them (undoes `use_fused_kernels`)."""
    for module in model.modules():
        module.__dict__.pop("forward", None)
    return model


def plain(assets, batch: int, steps: int, warmup: int, result, smoke: bool = False, compile: bool = False,
          part: str = "", **_):  # fmt: skip
    """CE + forward KL in a hand-written loop: teacher bf16 resident, student fp32 under bf16 autocast, the
    stock Hugging Face modules; with `compile`, both models through torch.compile."""
    from transformers import AutoTokenizer

    assets = Path(assets)
    kind = "plain, torch.compile" if compile else "plain"
    record = {"part": part, "kind": kind, "placement": "resident", "method": "kd", "batch": batch}
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


if __name__ == "__main__":  # one child process of bench/gpu_suite.py
    if DEVICE == "cpu":  # the suite's dry run: compiled parts trace with dynamo and run eagerly, no kernel builds
        import functools

        torch.compile = functools.partial(torch.compile, backend="eager")
    fire.Fire({"toolkit": toolkit, "plain": plain})
