"""Students of the quality benchmark's translation teacher as its speculative-decoding drafts (train/drafting.py;
DistillSpec): does distillation, and the CKA term, raise the share of draft tokens an encoder-decoder teacher accepts?

    python bench/translation_drafts.py [--seeds=3] [--sizes=20x,4x] [--prompts=32] [--steps=300] [--workers=2]

The teacher is bench/quality.py's (the demo's task, a T5 of 7.41M parameters, trained there once per output
directory). At each size (bench/quality.py's SIZES: 20x is 3+3 blocks of d_model 64, 4x is 4+4 blocks of 128) the
student is cut from the teacher (layers alternate, width by importance) and measured as the teacher's draft:
    (a) before training          the cut student's initial weights (the CE + KD run's student_init)
    (b) CE + KD                  bench/quality.py's `kd` method
    (c) CE + KD + CKA            its `cka` method (RMS-normalised states, the sum over the layer pairs)
    (d) CE only                  the same run with the KD term at weight 0
Each is measured by Hugging Face assisted generation, greedy, on the first `--prompts` validation sources, one at
a time, one thread, up to the demo's 48 new tokens: the acceptance rate, the mean accepted tokens per teacher step,
the speed-up over the teacher alone, and whether the outputs equal the teacher's alone. Seeds 0..N-1 (the
students' training seed): mean +- sd; paired differences seed by seed. Runs and their results are shared with
bench/quality.py (OUTPUT_DIR/runs); the table goes to OUTPUT_DIR/drafts/results.md.
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

import fire
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.quality import as_list, cost, mean_sd, prepare_teacher, run_jobs, student_run, write_table  # noqa: E402
from bench.smollm2_drafts import draft_cells, paired_acceptance  # noqa: E402
from ds_distill.train import drafting  # noqa: E402

BEFORE = "(a) before training"
TRAINED = {  # row -> (method, the run's own loss options), bench/quality.py's names
    "(b) CE + KD": ("kd", {}),
    "(c) CE + KD + CKA": ("cka", {}),
    "(d) CE only": ("kd", {"kd": {"weight": 0.0}}),
}
PAIRS = (("(b) CE + KD", BEFORE), ("(b) CE + KD", "(d) CE only"), ("(c) CE + KD + CKA", "(b) CE + KD"))


def main(seeds: int = 3, sizes=("20x", "4x"), prompts: int = 32, steps: int = 300, workers: int = 2,
         output_dir: str = "runs/bench/quality") -> None:  # fmt: skip
    from ds_distill.config.load import parse_run

    out = Path(output_dir)
    started = time.perf_counter()
    files, teacher = prepare_teacher(out)
    sizes = as_list(sizes)
    jobs, cells = {}, {}
    for size, (row, (method, losses)), seed in itertools.product(sizes, TRAINED.items(), range(seeds)):
        name, jobs[name] = student_run(files, teacher, out, size, "cut", method, losses, steps, seed)
        cells.setdefault((size, row), []).append(name)
    results = run_jobs(jobs, out / "queue", workers)

    torch.set_num_threads(1)
    run = parse_run(jobs[cells[sizes[0], "(b) CE + KD"][0]])
    prompt_ids = validation_sources(run, teacher, prompts)
    target = load(teacher)
    scores = {}
    for size in sizes:
        kd_runs = [Path(jobs[name]["train"]["output_dir"]) for name in cells[size, "(b) CE + KD"]]
        paths = {BEFORE: [path / "student_init" for path in kd_runs]}
        paths |= {
            row: [Path(jobs[name]["train"]["output_dir"]) / "model" for name in cells[size, row]] for row in TRAINED
        }
        for row, drafts in paths.items():
            for path in drafts:
                measured = drafting.draft_scores(target, load(path), prompt_ids, run.train.generation_max_length,
                                                 run_pad_id(teacher), progress=False)  # fmt: skip
                scores.setdefault((size, row), []).append(measured)
                print(f"{size} {row}, {path.parent.name}: {drafting.described(measured)}", flush=True)
    write_table(out / "drafts", "Students of the translation teacher as its speculative drafts",
                table(sizes, seeds, prompts, steps, scores, cells, results, started))  # fmt: skip


def validation_sources(run, teacher: Path, limit: int) -> list[list[int]]:
    """The first `limit` validation sources, tokenized as the runs tokenize them."""
    from datasets import DatasetDict

    from ds_distill.data import tokenized, tokenizers

    split = run.data.validation_split
    raw = tokenized.load_raw(run.data, need_train=False)
    dataset = tokenized.tokenize(run.data, tokenizers.load_tokenizer(str(teacher)), DatasetDict({split: raw[split]}))
    return drafting.draft_prompts(dataset[split], run.data, "seq2seq", limit)


def load(path: Path):
    from transformers import AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM.from_pretrained(path, dtype=torch.float32).eval()


def run_pad_id(teacher: Path) -> int:
    from ds_distill.data import tokenizers

    return tokenizers.load_tokenizer(str(teacher)).pad_token_id


def table(sizes, seeds, prompts, steps, scores, cells, results, started) -> list[str]:
    lines = [
        f"Teacher: bench/quality.py's translation T5 (7.41M). Students cut from it (layers alternate, width "
        f"importance), trained {steps} steps with bench/quality.py's settings. Hugging Face assisted generation, "
        f"greedy, the first {prompts} validation sources, up to 48 new tokens, one prompt at a time, one thread. "
        f"Seeds 0..{seeds - 1} (the students' training seed): mean +- sd. BLEU: the student's own, on the 400 "
        "validation pairs.",
        "",
        "| size | draft | student BLEU | acceptance rate | accepted tokens per teacher step | speed-up | "
        "identical outputs |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for size, row in scores:
        bleu = mean_sd([results[name]["bleu"] for name in cells[size, row]], 1) if row in TRAINED else ""
        lines.append(f"| {size} | {row} | {bleu} | {draft_cells(scores[size, row])} |")
    lines += ["", "Paired acceptance rate, seed by seed:", ""]
    for size in sizes:
        gains = (f"{a[:3]} - {b[:3]} = {paired_acceptance(scores[size, a], scores[size, b])}" for a, b in PAIRS)
        lines.append(f"- {size}: " + "; ".join(gains))
    lines += ["", cost(results, started)]
    return lines


if __name__ == "__main__":
    fire.Fire(main)
