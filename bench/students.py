"""Wall time of one run of four students on one teacher pass against four single runs (CPU).

    python bench/students.py [--steps=40] [--rounds=2]

Teacher-dominated shapes, as distillation's are (Flan-T5-XL -> 145M: the teacher's forward is ~85% of a step's
arithmetic): a random T5 teacher of 6+6 blocks at d_model 384 with a 2000-piece sentencepiece
vocabulary under teacher_zero3_inference_cpu.json, four students of 2+2 blocks at d_model 64 or 96 under
student_zero2.json, CE + KD (one with JSD), micro-batch 8 of EN-DE pairs at up to 48 + 48 tokens, one process.
Each run, from its checks to its export, is timed whole; rounds alternate the two ways so that the machine's
drift hits both alike. The ratio is (one run of four) / (four single runs); the issue's goal is <= 0.45.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import fire

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.step_overhead import build_teacher  # noqa: E402
from ds_distill import dist  # noqa: E402
from ds_distill.config.load import parse_run, parse_students  # noqa: E402
from tests import tiny_models  # noqa: E402

STUDENTS = {
    "narrow": {},
    "narrow_jsd": {"losses": {"kd": {"divergence": "jsd"}}},
    "wide": {"student": {"init": {"from_teacher": {"d_model": 96}}}},
    "wide_t1": {"student": {"init": {"from_teacher": {"d_model": 96}}}, "losses": {"kd": {"temperature": 1.0}}},
}


def tree(teacher: Path, output_dir: Path, steps: int) -> dict:
    return {
        "teacher": {"model_name_or_path": str(teacher), "deepspeed_config": "ds_configs/teacher_zero3_inference_cpu.json"},
        "student": {
            "init": {"from_teacher": {"encoder_layers": 2, "decoder_layers": 2, "d_model": 64, "num_heads": 2}},
            "deepspeed_config": "ds_configs/student_zero2.json",
        },
        "data": {
            "task": "translation", "dataset": "json", "source_lang": "en", "target_lang": "de",
            "data_files": {"train": str(tiny_models.SHARED_DATA / "train.jsonl")}, "validation_split": None,
            "max_source_length": 48, "max_target_length": 48,
        },
        "losses": {"ce": {"weight": 1.0}, "kd": {"weight": 1.0, "temperature": 2.0}},
        "train": {"output_dir": str(output_dir), "max_steps": steps, "per_device_train_batch_size": 8,
                  "logging_steps": 20, "learning_rate": 1e-3, "seed": 0},
    }  # fmt: skip


def flop_share(teacher: Path, runs: dict) -> float:
    """The teacher's share of a single run's arithmetic per token, 2 x teacher / (2 x teacher + 6 x student)
    parameters, averaged over the students."""
    from ds_distill import models
    from ds_distill.train.student import student_hf_config

    teacher_config = models.load_config(str(teacher), "teacher")
    teacher_params = models.count_parameters(teacher_config)
    shares = []
    for run in runs.values():
        student = models.count_parameters(student_hf_config(run.student, teacher_config))
        shares.append(2 * teacher_params / (2 * teacher_params + 6 * student))
    return statistics.mean(shares)


def main(steps: int = 40, rounds: int = 2) -> None:
    from ds_distill.config.load import merge
    from ds_distill.train.loop import train_student, train_students

    dist.init()
    work = Path(tempfile.mkdtemp(prefix="bench_students_"))
    tokenizer = tiny_models.train_tokenizer(work / "tokenizer", vocab_size=2000)
    teacher = build_teacher(work, tokenizer, d_model=384, d_ff=1536, num_heads=6, layers=6)
    base = tree(teacher, work / "runs", steps)

    def together() -> None:
        train_students(parse_students({**base, "students": STUDENTS}), overwrite=True)

    def alone() -> None:
        for name, entry in STUDENTS.items():
            run = merge(base, entry)
            run["train"]["output_dir"] = str(work / "alone" / name)
            train_student(parse_run(run), overwrite=True)

    share = flop_share(teacher, parse_students({**base, "students": STUDENTS}))
    times = {"together": [], "alone": []}
    for round_index in range(rounds):
        for way in ("together", "alone") if round_index % 2 == 0 else ("alone", "together"):
            started = time.perf_counter()
            (together if way == "together" else alone)()
            times[way].append(time.perf_counter() - started)
    ratios = [t / a for t, a in zip(times["together"], times["alone"])]
    print(
        f"teacher {share:.0%} of a single run's FLOPs; four students, {steps} steps: one run {statistics.mean(times['together']):.1f} s, four single runs "
        f"{statistics.mean(times['alone']):.1f} s (rounds: {', '.join(f'{t:.1f}/{a:.1f}' for t, a in zip(times['together'], times['alone']))}); "
        f"ratio {statistics.mean(ratios):.3f}"
    )


if __name__ == "__main__":
    fire.Fire(main)
