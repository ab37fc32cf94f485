"""Quality in miniature, in the shape of the CKA paper's table: KD-only vs KD+CKA vs KD+linear at two sizes.

    python bench/layer_loss_quality.py [--teacher_steps=1500] [--student_steps=600] [--output_dir=runs/bench_quality]

On ../shared/data/wmt_ende_10k (English -> German): a sentencepiece tokenizer and a T5 teacher (d_model 256, 4+4
blocks) are trained here from scratch; the last 500 training pairs are held out as the validation set (the
shipped valid.jsonl has only 50). Two students (d_model 128 and d_model 64, 2+2 blocks each, the same initial
weights for every method of one size) are then distilled for the same steps with `method: kd`, `cka` and `linear`.
Reports validation loss and greedy BLEU (sacrebleu) per run, and writes the table to OUTPUT_DIR/results.md.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import fire
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ds_distill import dist, models  # noqa: E402
from ds_distill.config import FromTeacherConfig, RunConfig, expand_method, from_dict  # noqa: E402
from ds_distill.data import train_sentencepiece_tokenizer  # noqa: E402
from ds_distill.ds_config import PROJECT_ROOT  # noqa: E402
from tests.tiny_models import SHARED_DATA  # noqa: E402

TEACHER_SHAPE = dict(d_model=256, d_ff=1024, num_layers=4, num_decoder_layers=4, num_heads=4, d_kv=64)
STUDENTS = {
    "d128": FromTeacherConfig(encoder_layers=2, decoder_layers=2, d_model=128, d_ff=512, num_heads=2),
    "d64": FromTeacherConfig(encoder_layers=2, decoder_layers=2, d_model=64, d_ff=256, num_heads=2),
}
METHODS = ("kd", "cka", "linear")
HELD_OUT = 500


def split_data(directory: Path) -> dict[str, str]:
    lines = open(SHARED_DATA / "train.jsonl").read().splitlines()
    directory.mkdir(parents=True, exist_ok=True)
    files = {"train": str(directory / "train.jsonl"), "validation": str(directory / "validation.jsonl")}
    Path(files["train"]).write_text("\n".join(lines[:-HELD_OUT]) + "\n")
    Path(files["validation"]).write_text("\n".join(lines[-HELD_OUT:]) + "\n")
    return files


def save_initial_models(tokenizer, directory: Path) -> dict[str, Path]:
    from transformers import T5Config

    config = T5Config(
        vocab_size=-(-len(tokenizer) // 64) * 64,
        feed_forward_proj="relu",
        decoder_start_token_id=tokenizer.pad_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        dropout_rate=0.1,
        **TEACHER_SHAPE,
    )
    adapter = models.adapter_for(config)
    shapes = {"teacher": config, **{name: adapter.shrink(config, dims) for name, dims in STUDENTS.items()}}
    paths = {}
    for name, shape in shapes.items():
        torch.manual_seed(0)
        paths[name] = directory / f"{name}_init"
        adapter.from_config(shape).save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return paths


def run_config(output_dir: Path, files, model: Path, teacher: Path | None, method: str, steps: int, lr: float):
    tree = {
        "method": method,
        "teacher": {
            "model_name_or_path": str(teacher) if teacher else None,
            "deepspeed_config": str(PROJECT_ROOT / "ds_configs" / "teacher_zero3_inference_cpu.json"),
        },
        "student": {
            "model_name_or_path": str(model),
            "deepspeed_config": str(PROJECT_ROOT / "ds_configs" / "student_zero2.json"),
        },
        "data": {
            "task": "translation",
            "dataset": "json",
            "data_files": files,
            "source_lang": "en",
            "target_lang": "de",
            "max_source_length": 64,
            "max_target_length": 64,
        },
        "train": {
            "output_dir": str(output_dir),
            "max_steps": steps,
            "per_device_train_batch_size": 32,
            "learning_rate": lr,
            "warmup_steps": steps // 20,
            "logging_steps": 50,
            "eval_metric": "bleu",
            "generation_max_length": 64,
            "per_device_eval_batch_size": 100,
            "seed": 0,
        },
    }
    if teacher is None:
        tree["losses"] = {"ce": {"weight": 1.0}}
        del tree["method"]
    return from_dict(RunConfig, expand_method(tree))


def final_eval(run_dir: Path) -> dict[str, float]:
    evals = [json.loads(line) for line in open(run_dir / "log.jsonl") if "eval/loss" in line]
    return {"loss": evals[-1]["eval/loss"], "bleu": evals[-1]["eval/bleu"]}


def main(teacher_steps: int = 1500, student_steps: int = 600, output_dir: str = "runs/bench_quality") -> None:
    from ds_distill.trainer import distill

    dist.init()
    out = Path(output_dir)
    started = time.perf_counter()
    files = split_data(out / "data")
    tokenizer = train_sentencepiece_tokenizer(files["train"], ("en", "de"), out / "tokenizer", vocab_size=4000)
    initial = save_initial_models(tokenizer, out)
    teacher = distill(
        run_config(out / "teacher", files, initial["teacher"], None, "", teacher_steps, 5e-4), overwrite=True
    )
    rows = [
        ("teacher", models.count_parameters(models.load_config(str(teacher), "t")), "CE", final_eval(teacher.parent))
    ]
    for size in STUDENTS:
        params = models.count_parameters(models.load_config(str(initial[size]), "s"))
        for method in METHODS:
            run_dir = out / f"{size}_{method}"
            config = run_config(run_dir, files, initial[size], teacher, method, student_steps, 1e-3)
            distill(config, overwrite=True)
            rows.append((f"student {size}", params, " + ".join(config.losses), final_eval(run_dir)))
    table = [
        f"teacher {teacher_steps} steps, students {student_steps} steps, validation: {HELD_OUT} held-out pairs",
        "",
        "| model | parameters | ratio | objective | validation loss | BLEU |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for name, params, objective, scores in rows:
        table.append(
            f"| {name} | {params / 1e6:.2f}M | {rows[0][1] / params:.1f}x | {objective} | "
            f"{scores['loss']:.3f} | {scores['bleu']:.2f} |"
        )
    text = "\n".join(table)
    (out / "results.md").write_text(text + "\n")
    print(f"\n{text}\n\n{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    fire.Fire(main)
