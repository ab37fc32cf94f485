"""Direct distillation vs a two-stage teacher-assistant chain, on SmolLM2-135M and real English text.

    python bench/smollm2_chain.py [--steps=120] [--batch=4] [--output_dir=runs/bench_smollm2_chain]

The final student (6 blocks, width 384, 6 query / 2 key-value heads, FFN 1024: 28.3M parameters, 4.8x smaller
than the teacher) is reached two ways with the same number of student steps in all:

    direct   cut from the teacher (blocks alternate, width by activation) and distilled by it for STEPS
    chain    `ds-distill chain`: an assistant of 15 blocks at full width cut from the teacher and distilled by
             it for STEPS/2, then the student cut from the assistant and distilled by it for STEPS/2

Data, teacher and held-out perplexity as in bench/smollm2_students.py (CE + KD, one CPU process).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import fire

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.smollm2_students import english_text, held_out, run_config, teacher_dir  # noqa: E402
from ds_distill import chain, dist, models  # noqa: E402
from ds_distill.config.deepspeed import PROJECT_ROOT  # noqa: E402
from ds_distill.config.run import to_dict  # noqa: E402

STUDENT = {"decoder_layers": 6, "d_model": 384, "d_ff": 1024, "num_heads": 6}
ASSISTANT = {"decoder_layers": 15}
LR = 3e-4


def sliced(dims: dict) -> dict:
    return {"from_teacher": {**dims, "strategy": "sliced", "layers": "alternate", "width": "importance"}}


def main(steps: int = 120, batch: int = 4, output_dir: str = "runs/bench_smollm2_chain") -> None:
    from ds_distill.train.loop import train_student

    dist.init()
    out = Path(output_dir)
    teacher = teacher_dir(PROJECT_ROOT / ".bench_assets")
    files = english_text(out / "data")
    rows = []

    started = time.perf_counter()
    direct = run_config(
        out / "direct", files, teacher, {"student": sliced(STUDENT), "method": "kd", "lr": LR}, steps, batch
    )
    exported = train_student(direct, overwrite=True)
    rows.append(("direct: teacher -> student", exported, direct, time.perf_counter() - started))

    stage = run_config(out / "unused", files, teacher, {"student": sliced(ASSISTANT), "method": "kd", "lr": LR},
                       steps // 2, batch)  # fmt: skip
    defaults = to_dict(stage)
    del defaults["train"]["output_dir"], defaults["student"]["init"]
    tree = {
        "output_dir": str(out / "chain"),
        "defaults": defaults,
        "stages": [
            {"name": "assistant", "student": {"init": sliced(ASSISTANT)}},
            {"name": "student", "student": {"init": sliced(STUDENT)}},
        ],
    }
    started = time.perf_counter()
    manifest = chain.run_chain(tree)
    seconds = time.perf_counter() - started
    for name, label in (
        ("assistant", "chain stage 1: teacher -> assistant"),
        ("student", "chain: assistant -> student"),
    ):
        rows.append((label, Path(manifest["stages"][name]["export"]), stage, seconds))

    table = [
        f"SmolLM2-135M-Instruct teacher; English side of wmt_ende_10k; CE + KD, {batch} blocks of 128 tokens per "
        f"step; direct {steps} steps, chain {steps // 2} + {steps // 2}",
        "",
        "| model | parameters | held-out perplexity | run s |",
        "|---|---:|---:|---:|",
    ]
    teacher_ppl, _ = held_out(teacher, direct)
    table.append(f"| teacher | {models.count_parameters(models.load_config(str(teacher), 't')) / 1e6:.1f}M | "
                 f"{teacher_ppl:.2f} | |")  # fmt: skip
    for label, model_dir, config, seconds in rows:
        ppl, _ = held_out(model_dir, config)
        params = models.count_parameters(models.load_config(str(model_dir), "m"))
        table.append(f"| {label} | {params / 1e6:.1f}M | {ppl:.2f} | {seconds:.0f} |")
    text = "\n".join(table)
    (out / "results.md").write_text(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    fire.Fire(main)
