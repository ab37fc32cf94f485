"""How far an accumulated bf16 step drifts from the same samples in one micro-batch: bf16 vs fp32 accumulation (CPU).

    python bench/grad_accum_dtype.py

A tiny GPT-2 student under DeepSpeed ZeRO-2 (`ds_configs/student_zero2.json`), bf16, one CPU rank. The same 8
sequences of equal length make one optimizer step as 1 micro-batch of 8, as 2 of 4 and as 8 of 1; the
step's gradient (read before the update) is compared with the 1 x 8 one, first with DeepSpeed's default for
bf16 (micro-batches summed in bf16: `data_types` removed), then with `data_types.grad_accum_dtype` "fp32" as the
shipped student configs set it. Each micro-batch's own gradient is still computed in bf16, so the gap does not
go to zero: what is left is the rounding of the micro-batch gradients themselves.

Printed per split: the relative difference of all gradients together, ||g - g_1x8|| / ||g_1x8||, and the
largest such difference of one weight tensor.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ds_distill import dist  # noqa: E402
from ds_distill.config import deepspeed as ds_config  # noqa: E402
from ds_distill.config.run import TrainConfig  # noqa: E402

SAMPLES, SEQUENCE_TOKENS, VOCABULARY = 8, 32, 256
SPLITS = [(8, 1), (4, 2), (1, 8)]  # (micro-batch, accumulation steps)


def student():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCABULARY, n_positions=SEQUENCE_TOKENS, n_embd=64, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(1)
    return GPT2LMHeadModel(config)


def step_gradient(samples: torch.Tensor, micro_batch: int, accumulation: int, grad_accum_dtype: str | None):
    """{name: fp32 copy of the step's full gradient} after `accumulation` backward passes, before the update."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    train = TrainConfig(
        per_device_train_batch_size=micro_batch, gradient_accumulation_steps=accumulation, bf16=True, max_grad_norm=1e9
    )
    path = "ds_configs/student_zero2.json"
    config = ds_config.fill_auto(ds_config.load_json(path), train, 1, 1, on_cpu=True, name=path)
    config.pop("data_types", None)
    if grad_accum_dtype is not None:
        config["data_types"] = {"grad_accum_dtype": grad_accum_dtype}
    model = student()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    for index in range(accumulation):
        batch = samples[index * micro_batch : (index + 1) * micro_batch]
        # equal lengths: each micro-batch's mean loss, averaged by DeepSpeed over the steps, is the step's mean
        engine.backward(engine(input_ids=batch, labels=batch).loss)
        if index < accumulation - 1:
            engine.step()  # a micro-step: DeepSpeed only accumulates
    gradient = {name: safe_get_full_grad(p).float().clone() for name, p in engine.module.named_parameters()}
    engine.step()
    return gradient


def gaps(gradient: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(all weights together, worst weight tensor) relative differences."""
    difference = torch.cat([(gradient[n] - reference[n]).flatten() for n in reference])
    together = float(difference.norm() / torch.cat([r.flatten() for r in reference.values()]).norm())
    worst = max(float((gradient[n] - r).norm() / r.norm()) for n, r in reference.items())
    return together, worst


def main() -> None:
    dist.init()
    torch.manual_seed(0)
    samples = torch.randint(0, VOCABULARY, (SAMPLES, SEQUENCE_TOKENS))
    print(f"{'accumulation':<14} {'split':<6} {'all weights':>12} {'worst tensor':>13}")
    for label, dtype in (("bf16 (before)", None), ("fp32 (after)", "fp32")):
        gradients = {split: step_gradient(samples, *split, dtype) for split in SPLITS}
        for micro_batch, accumulation in SPLITS[1:]:
            together, worst = gaps(gradients[(micro_batch, accumulation)], gradients[SPLITS[0]])
            print(f"{label:<14} {accumulation}x{micro_batch:<4} {together:>12.2e} {worst:>13.2e}", flush=True)
    dist.shutdown()


if __name__ == "__main__":
    main()
