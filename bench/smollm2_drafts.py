"""Students of SmolLM2-135M-Instruct as its speculative-decoding drafts (train/drafting.py; DistillSpec): does
distillation raise the share of draft tokens the teacher accepts?

    python bench/smollm2_drafts.py [--seeds=3] [--prompts=16] [--new_tokens=32] [--rows=abcdef]

Students (12 blocks x 384, the teacher's vocabulary; bench/smollm2_vocabulary.py's runs, trained there or here
with the same settings: 120 steps x 4 blocks x 64 tokens of the English side of wmt_ende_10k):
    (a) cut from the teacher, before any training      the cut student's initial weights (its run's student_init)
    (b) cut, CE + KD                                   the distilled student
    (c) cut, CE                                        trained on the labels alone, no teacher
    (d) random init, CE + KD                           distilled from random weights
    (e) own vocabulary, cut, CE                        a vocabulary of its own (`--vocab_size` ids), labels alone
    (f) own vocabulary, cut, CE + hybrid               and KD across tokenizers (`cross_tokenizer: hybrid`)
(e) and (f) draft across tokenizers (Hugging Face's universal assisted decoding: the text is re-encoded each step;
proposals and acceptances are counted in the teacher's tokens).
Each is measured by Hugging Face assisted generation, greedy, on the first `--prompts` held-out lines (their
first 40 characters), `--new_tokens` new tokens each, one prompt at a time, one thread, the models one after the
other: the acceptance rate, the mean accepted tokens per teacher step, the speed-up over the teacher alone, and
whether the outputs equal the teacher's alone. Seeds 0..N-1 (the students' training seed): mean +- sd; paired:
(b) minus (a), (b) minus (c), (d) minus (c) and (f) minus (e), seed by seed. `--rows`: the letters of the rows
measured (the table goes to OUTPUT_DIR/drafts, or OUTPUT_DIR/drafts_ROWS for part of them).
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

import fire
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.quality import cost, mean_sd, named, run_jobs, write_table  # noqa: E402
from bench.smollm2_students import STUDENT, english_text, teacher_dir  # noqa: E402
from bench.smollm2_vocabulary import CUT, own_tokenizer, run_tree  # noqa: E402
from ds_distill.config.deepspeed import PROJECT_ROOT  # noqa: E402
from ds_distill.train import drafting  # noqa: E402

TRAINED = {  # row -> (own vocabulary?, student.init, the KD term or None), as bench/smollm2_vocabulary.py has them
    "(b) cut, CE + KD": (False, {**STUDENT, **CUT}, "kd"),
    "(c) cut, CE": (False, {**STUDENT, **CUT}, None),
    "(d) random init, CE + KD": (False, {**STUDENT, "strategy": "random"}, "kd"),
    "(e) own vocabulary, cut, CE": (True, {**STUDENT, **CUT}, None),
    "(f) own vocabulary, cut, CE + hybrid": (True, {**STUDENT, **CUT}, "hybrid"),
}
BEFORE = "(a) cut, before training"
PAIRS = (  # (row, baseline): the acceptance rate's paired differences
    ("(b) cut, CE + KD", BEFORE),
    ("(b) cut, CE + KD", "(c) cut, CE"),
    ("(d) random init, CE + KD", "(c) cut, CE"),
    ("(f) own vocabulary, cut, CE + hybrid", "(e) own vocabulary, cut, CE"),
)


def main(seeds: int = 3, prompts: int = 16, new_tokens: int = 32, steps: int = 120, batch: int = 4,
         block_size: int = 64, vocab_size: int = 8000, rows: str = "abcdef", workers: int = 2,
         output_dir: str = "runs/bench/smollm2_vocabulary") -> None:  # fmt: skip
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(output_dir).resolve()
    started = time.perf_counter()
    teacher = teacher_dir(PROJECT_ROOT / ".bench_assets")
    files = english_text(out / "data")
    reference = run_tree(teacher, files, TRAINED["(b) cut, CE + KD"][1], "kd", steps, batch, block_size, 0)
    vocabulary = own_tokenizer(out, reference, vocab_size)
    chosen = [row for row in (BEFORE, *TRAINED) if row[1] in rows]
    trained = {row: TRAINED[row] for row in TRAINED if row in chosen or (row.startswith("(b)") and BEFORE in chosen)}
    jobs, cells = {}, {}
    for (row, (own, init, kd)), seed in itertools.product(trained.items(), range(seeds)):
        init = {**init, **({"tokenizer": str(vocabulary)} if own else {})}
        prefix = f"{'own' if own else 'teacher'}_{init['strategy']}_{init['decoder_layers']}_{kd or 'ce'}_s{seed}"
        name, jobs[name] = named(out, prefix, run_tree(teacher, files, init, kd, steps, batch, block_size, seed))
        cells.setdefault(row, []).append(Path(jobs[name]["train"]["output_dir"]) / "model")
    results = run_jobs(jobs, out / "queue", workers)
    if BEFORE in chosen:
        cells[BEFORE] = [path.parent / "student_init" for path in cells["(b) cut, CE + KD"]]
    cells = {row: cells[row] for row in chosen}

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    lines = [json.loads(line)["text"][:40] for line in open(files["validation"])][:prompts]
    prompt_ids = [tokenizer(line)["input_ids"] for line in lines]
    target = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    scores = {}
    for row, paths in cells.items():
        for path in paths:
            draft = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            draft_tokenizer = AutoTokenizer.from_pretrained(path)
            drafting.check_pair(draft.config, target.config, draft_tokenizer, tokenizer, str(path))
            scores.setdefault(row, []).append(
                drafting.draft_scores(target, draft, prompt_ids, new_tokens, tokenizer.pad_token_id, False,
                                      (tokenizer, draft_tokenizer))
            )  # fmt: skip
            print(f"{row}, {path.parent.name}: {drafting.described(scores[row][-1])}", flush=True)

    table = [
        f"Teacher SmolLM2-135M-Instruct; students 12 blocks x 384 (37.8M with the teacher's vocabulary; (e) and (f) "
        f"have {vocab_size} ids of their own and draft across tokenizers, universal assisted decoding), trained "
        f"{steps} steps x {batch} x {block_size} tokens (bench/smollm2_vocabulary.py's settings). Hugging Face assisted "
        f"generation, greedy, {prompts} held-out prompts (40 characters), {new_tokens} new tokens each, one thread, "
        f"one prompt at a time. Seeds 0..{seeds - 1} (the students' training seed): mean +- sd.",
        "",
        "| draft | acceptance rate | accepted tokens per teacher step | speed-up | identical outputs |",
        "|---|---:|---:|---:|---:|",
    ]
    table += [f"| {row} | {draft_cells(scores[row])} |" for row in scores]
    table += [
        "",
        "Prompts left out where Hugging Face's universal assisted decoding failed (per seed): "
        + "; ".join(f"{row[:3]} {[r.get('draft/failed_prompts', 0) for r in scores[row]]}" for row in scores)
        + ".",
        "",
        "Paired acceptance rate, seed by seed: "
        + "; ".join(
            f"{a[:3]} - {b[:3]} = {paired_acceptance(scores[a], scores[b])}"
            for a, b in PAIRS
            if a in scores and b in scores
        )
        + ".",
        "",
        cost(results, started),
    ]
    where = out / ("drafts" if len(chosen) == 1 + len(TRAINED) else f"drafts_{rows}")
    write_table(where, "SmolLM2-135M students as its speculative drafts", table)


def draft_cells(seeds: list[dict]) -> str:
    """A row's draft figures over its seeds: acceptance rate | accepted tokens per step | speed-up | identical."""
    keys = {"draft/acceptance_rate": 3, "draft/mean_accepted_tokens": 2, "draft/speedup": 2, "draft/identical": 2}
    return " | ".join(mean_sd([result[key] for result in seeds], digits) for key, digits in keys.items())


def paired_acceptance(seeds: list[dict], baseline: list[dict]) -> str:
    """The acceptance rate minus the baseline's, seed by seed: mean +- sd."""
    pairs = zip(seeds, baseline, strict=True)
    return mean_sd([a["draft/acceptance_rate"] - b["draft/acceptance_rate"] for a, b in pairs], 3)


if __name__ == "__main__":
    fire.Fire(main)
