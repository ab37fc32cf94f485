"""Padding and throughput with and without length-grouped batches, on the shared WMT sample (CPU).

    python bench/length_grouping.py [--steps=40] [--rounds=2] [--output_dir=runs/bench_grouping]

A tiny T5 teacher (d_model 64, 2+2 blocks, random weights: the cost is what is measured) distils into a
student half its size on ../shared/data/wmt_ende_10k (English -> German, up to 128 + 128 tokens, micro-batch
32), one process, `train.group_by_length` false and true in alternating rounds. Reports the logged
padding fraction (positions computed that are padding) and real tokens/s of each.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import fire

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ds_distill import dist  # noqa: E402
from ds_distill.config.run import RunConfig  # noqa: E402
from ds_distill.config.typed import from_dict  # noqa: E402
from tests import tiny_models  # noqa: E402
from tests.conftest import translation_config  # noqa: E402


def main(steps: int = 40, rounds: int = 2, output_dir: str = "runs/bench_grouping") -> None:
    from ds_distill.train.loop import train_student

    dist.init()
    out = Path(output_dir)
    tokenizer = tiny_models.train_tokenizer(out / "tokenizer")
    tiny = {**tiny_models.build(out, tokenizer), "tokenizer": out / "tokenizer"}
    measured = {False: [], True: []}
    for round_ in range(rounds):
        for grouped in (False, True):
            run_dir = out / f"grouped_{grouped}_{round_}"
            tree = translation_config(
                tiny, run_dir,
                data={"max_source_length": 128, "max_target_length": 128, "max_train_samples": None,
                      "validation_split": None},
                train={"max_steps": steps, "per_device_train_batch_size": 32, "gradient_accumulation_steps": 1,
                       "save_steps": 0, "logging_steps": steps // 2, "group_by_length": grouped},
            )  # fmt: skip
            train_student(from_dict(RunConfig, tree), overwrite=True)
            last = [json.loads(line) for line in open(run_dir / "log.jsonl") if "tokens_per_s" in line][-1]
            measured[grouped].append((last["padding_fraction"], last["tokens_per_s"]))
    lines = ["| batches | padding fraction | real tokens/s (rounds) |", "|---|---:|---:|"]
    for grouped, rows in measured.items():
        speeds = ", ".join(f"{speed:,.0f}" for _, speed in rows)
        lines.append(f"| {'grouped by length' if grouped else 'random'} | {rows[-1][0]:.3f} | {speeds} |")
    ratio = sum(s for _, s in measured[True]) / sum(s for _, s in measured[False])
    text = "\n".join(lines) + f"\n\ngrouped / random tokens/s: {ratio:.2f}"
    (out / "results.md").write_text(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    fire.Fire(main)
