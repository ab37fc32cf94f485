"""Step time of layer-wise losses against logit-only KD on the same models, as ratios (one process).

    python bench/layer_loss_cost.py [--rounds=3] [--steps_per_round=2] [--batch=16] [--length=128]

A slice of the Flan-T5-XL -> 145M recipe at its real widths: a T5 teacher with Flan-T5-XL's width (d_model 2048,
d_ff 5120, 32 heads x 64, gated-gelu, vocabulary 32128) and 2+2 blocks under ZeRO-3 inference, a student with the
145M recipe's width (d_model 512, d_ff 2048, 8 heads) and 1+1 blocks under ZeRO-2: two teacher blocks per student
block, as in the 24 -> 12 recipe. Micro-batches of `batch` x `length` source and target tokens (16 x 128: 4,096
tokens). Methods `kd` (CE + KD), `cka`, `miniend_d` and `makd` (each CE + KD + its term) take turns in rounds, so
drift of the machine hits all alike; each reports ms/step and its ratio to `kd`.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import fire
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ds_distill import dist  # noqa: E402
from ds_distill.config.deepspeed import PROJECT_ROOT  # noqa: E402
from ds_distill.config.load import expand_method  # noqa: E402
from ds_distill.config.run import RunConfig  # noqa: E402
from ds_distill.config.typed import from_dict  # noqa: E402
from tests import tiny_models  # noqa: E402

METHODS = ("kd", "cka", "miniend_d", "makd")


def save_teacher(directory: Path, tokenizer) -> Path:
    from transformers import T5Config

    from ds_distill.models import adapter_for

    config = T5Config(
        vocab_size=32128, d_model=2048, d_ff=5120, d_kv=64, num_heads=32, num_layers=2, num_decoder_layers=2,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    adapter_for(config).from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def run_config(method: str, teacher: Path, output_dir: Path, batch: int) -> RunConfig:
    tree = {
        "method": method,
        "teacher": {
            "model_name_or_path": str(teacher),
            "deepspeed_config": str(PROJECT_ROOT / "ds_configs" / "teacher_zero3_inference.json"),
        },
        "student": {
            "init": {
                "from_teacher": {"encoder_layers": 1, "decoder_layers": 1, "d_model": 512, "d_ff": 2048, "num_heads": 8}
            },
            "deepspeed_config": str(PROJECT_ROOT / "ds_configs" / "student_zero2.json"),
        },
        "data": {
            "task": "translation",
            "dataset": "json",
            "data_files": {"train": str(tiny_models.SHARED_DATA / "train.jsonl")},
            "validation_split": None,
            "source_lang": "en",
            "target_lang": "de",
            "max_train_samples": 256,
        },
        "train": {"output_dir": str(output_dir), "max_steps": 1000, "per_device_train_batch_size": batch, "seed": 0},
    }
    return from_dict(RunConfig, expand_method(tree))


def synthetic_batch(batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    """Full-length rows (no padding), so every method sees exactly batch x length tokens per side."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(2, 32000, (batch, length), generator=generator)
    return {
        "input_ids": torch.randint(2, 32000, (batch, length), generator=generator),
        "attention_mask": torch.ones(batch, length, dtype=torch.long),
        "labels": labels,
        "decoder_input_ids": torch.cat([torch.zeros(batch, 1, dtype=torch.long), labels[:, :-1]], dim=1),
    }


def main(rounds: int = 3, steps_per_round: int = 2, batch: int = 16, length: int = 128) -> None:
    from ds_distill.train.loop import Trainer
    from ds_distill.train.prepare import prepare

    dist.init()
    work = Path(tempfile.mkdtemp(prefix="layer_loss_cost_"))
    tokenizer = tiny_models.train_tokenizer(work / "tokenizer")
    teacher = save_teacher(work / "teacher", tokenizer)
    trainers = {m: Trainer(prepare(run_config(m, teacher, work / m, batch))) for m in METHODS}
    for trainer in trainers.values():
        trainer.begin()
    batches = [synthetic_batch(batch, length, seed) for seed in range(steps_per_round)]
    seconds = dict.fromkeys(METHODS, 0.0)
    for round_index in range(rounds + 1):  # round 0 warms up, untimed
        for method, trainer in trainers.items():
            started = time.perf_counter()
            for micro_batch in batches:
                trainer.optimizer_step([micro_batch])
            if round_index:
                seconds[method] += time.perf_counter() - started
    steps = rounds * steps_per_round
    print(f"{batch} x {length} source + target tokens per micro-batch, {steps} timed steps per method")
    print("| method | terms | ms/step | ratio to kd |")
    print("|---|---|---:|---:|")
    for method, trainer in trainers.items():
        terms = " + ".join(trainer.students[0].engine.module.losses)
        ratio = seconds[method] / seconds["kd"]
        print(f"| {method} | {terms} | {1000 * seconds[method] / steps:,.0f} | {ratio:.3f} |")


if __name__ == "__main__":
    fire.Fire(main)
