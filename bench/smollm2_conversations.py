"""A student of SmolLM2-135M-Instruct distilled on conversations (`data.messages_field`): held-out bits per byte of
the assistant turns, and its acceptance as the teacher's speculative draft (`train.eval_draft_for`).

    python bench/smollm2_conversations.py [--seeds=3] [--steps=120]

The conversations are written from the English side of wmt_ende_10k: the user asks to continue a sentence's
first half, the assistant answers with its second half. SmolLM2's own chat template renders them (its default
system prompt included); only the assistant turns are targets. Students: 12 blocks x 384 cut from the teacher
(bench/smollm2_vocabulary.py's cut), CE + KD against CE alone, `--steps` steps x 4 conversations, one thread per
run, two at a time. The draft is measured at the run's last evaluation on the first 32 held-out conversations,
32 new tokens each. Seeds 0..N-1: mean +- sd; paired: CE + KD minus CE, seed by seed.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

import fire

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.quality import cost, mean_sd, named, run_jobs, write_table  # noqa: E402
from bench.smollm2_students import HELD_OUT, SHARED_DATA, STUDENT, teacher_dir  # noqa: E402
from bench.smollm2_vocabulary import CUT, run_tree, teacher_bits_per_byte  # noqa: E402
from ds_distill.config.deepspeed import PROJECT_ROOT  # noqa: E402


def conversations(directory: Path) -> dict[str, str]:
    """train.jsonl and validation.jsonl, one conversation per line, the last HELD_OUT sentences held out."""
    lines = [json.loads(line)["translation"]["en"] for line in open(SHARED_DATA / "train.jsonl")]
    directory.mkdir(parents=True, exist_ok=True)
    files = {"train": str(directory / "train.jsonl"), "validation": str(directory / "validation.jsonl")}
    for split, part in (("train", lines[:-HELD_OUT]), ("validation", lines[-HELD_OUT:])):
        with open(files[split], "w") as out:
            for text in part:
                words = text.split()
                half = max(1, len(words) // 2)
                messages = [{"role": "user", "content": f"Continue this sentence: {' '.join(words[:half])}"},
                            {"role": "assistant", "content": " ".join(words[half:]) or "."}]  # fmt: skip
                out.write(json.dumps({"messages": messages}) + "\n")
    return files


def main(seeds: int = 3, steps: int = 120, batch: int = 4, block_size: int = 128, workers: int = 2,
         output_dir: str = "runs/bench/smollm2_conversations") -> None:  # fmt: skip
    out = Path(output_dir).resolve()
    started = time.perf_counter()
    teacher = teacher_dir(PROJECT_ROOT / ".bench_assets")
    files = conversations(out / "data")
    jobs, cells = {}, {}
    for (row, kd), seed in itertools.product((("cut, CE + KD", "kd"), ("cut, CE", None)), range(seeds)):
        tree = run_tree(teacher, files, {**STUDENT, **CUT}, kd, steps, batch, block_size, seed)
        tree["data"]["messages_field"] = "messages"
        tree["train"].update(eval_draft_for=str(teacher), generation_max_length=32)
        name, jobs[name] = named(out, f"conversations_{kd or 'ce'}_s{seed}", tree)
        cells.setdefault(row, []).append(name)
    results = run_jobs(jobs, out / "queue", workers)

    def column(row: str, key: str, digits: int) -> str:
        return mean_sd([results[name][key] for name in cells[row]], digits)

    def paired(key: str, digits: int) -> str:
        pairs = zip(cells["cut, CE + KD"], cells["cut, CE"], strict=True)
        return mean_sd([results[a][key] - results[b][key] for a, b in pairs], digits)

    table = [
        f"Teacher SmolLM2-135M-Instruct; students 12 blocks x 384 (37.8M) cut from it; {steps} steps x {batch} "
        "conversations (SmolLM2's chat template, assistant turns as targets), one thread per run. Held out: "
        f"{HELD_OUT} conversations (bits per byte of their assistant turns); the first 32 as draft prompts, 32 new "
        f"tokens each, greedy. Seeds 0..{seeds - 1}: mean +- sd.",
        "",
        "| student | held-out bits per byte (assistant turns) | draft acceptance rate | accepted tokens per step "
        "| speed-up | identical outputs |",
        "|---|---:|---:|---:|---:|---:|",
        f"| teacher (SmolLM2-135M) | {teacher_bits_per_byte(out, teacher, jobs[cells['cut, CE'][0]]):.4f} | | | | |",
    ]
    for row in cells:
        table.append(f"| {row} | {column(row, 'bits_per_byte', 4)} | {column(row, 'draft/acceptance_rate', 3)} | "
                     f"{column(row, 'draft/mean_accepted_tokens', 2)} | {column(row, 'draft/speedup', 3)} | "
                     f"{column(row, 'draft/identical', 2)} |")  # fmt: skip
    table += [
        "",
        f"Paired, CE + KD minus CE, seed by seed: bits per byte {paired('bits_per_byte', 4)}; acceptance rate "
        f"{paired('draft/acceptance_rate', 3)}.",
        "",
        cost(results, started),
    ]
    write_table(out, "SmolLM2-135M distilled on conversations", table)


if __name__ == "__main__":
    fire.Fire(main)
