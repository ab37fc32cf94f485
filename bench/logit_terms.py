"""Time and memory of CE + KD on a real vocabulary: the chunked terms against whole-tensor float32 terms (CPU).

    python bench/logit_terms.py [--tokens=1024] [--vocab=49152] [--repeats=7]

Random logits of one micro-batch (4 rows of tokens/4 positions, a quarter of the last row padding), student and
teacher, CE + forward KL at T = 2, forward and backward. The whole-tensor terms are the formulas the toolkit
used before (float32 copies of the whole logits, padding included), written out here. Repeats alternate between
the two; times are mean +- sd, memory is the peak of tensors alive during the terms (`planner.trace`).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import fire
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ds_distill.objectives.layerwise import ModelPair  # noqa: E402
from ds_distill.objectives.registry import build_losses, weighted_terms  # noqa: E402
from ds_distill.planner.trace import LiveTensorBytes  # noqa: E402


def whole_tensor_terms(student, teacher, labels, temperature=2.0):
    mask = labels != -100
    logits = student.float()
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none").view_as(labels)
    log_s = F.log_softmax(logits / temperature, -1)
    log_t = F.log_softmax(teacher.float() / temperature, -1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    count = mask.sum()
    return torch.where(mask, ce, 0.0).sum() / count + torch.where(mask, kl, 0.0).sum() / count * temperature**2


def main(tokens: int = 1024, vocab: int = 49152, repeats: int = 7, dtype: str = "float32") -> None:
    from transformers import LlamaConfig

    torch.manual_seed(0)
    dtype = getattr(torch, dtype)
    rows = 4
    student = torch.randn(rows, tokens // rows, vocab).to(dtype).requires_grad_(True)
    teacher = torch.randn(rows, tokens // rows, vocab).to(dtype)
    labels = torch.randint(0, vocab, (rows, tokens // rows))
    labels[-1, -(tokens // rows // 4) :] = -100
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    losses, weights = build_losses({"ce": {}, "kd": {"temperature": 2.0}}, ModelPair(config, config))

    def chunked():
        total, _ = weighted_terms(losses, weights, {"logits": student, "labels": labels}, {"logits": teacher}, None)
        return total

    def whole():
        return whole_tensor_terms(student, teacher, labels)

    values, seconds, peaks = {}, {"chunked": [], "whole": []}, {}
    for repeat in range(repeats + 1):  # the first round warms up
        for name, terms in (("chunked", chunked), ("whole", whole)):
            student.grad = None
            started = time.perf_counter()
            loss = terms()
            loss.backward()
            if repeat:
                seconds[name].append(time.perf_counter() - started)
            values[name] = (loss.item(), student.grad.clone())
    for name, terms in (("chunked", chunked), ("whole", whole)):
        tracker = LiveTensorBytes()
        tracker.exclude([student, teacher, labels])
        with tracker:
            terms().backward()
        peaks[name] = tracker.peak
    logits_mb = student.numel() * student.element_size() / 2**20
    print(f"{rows} x {tokens // rows} positions x {vocab} words, {dtype}, CE + KD (T=2); logits {logits_mb:.0f} MB")
    for name in ("whole", "chunked"):
        print(
            f"{name:>8}: {1000 * statistics.mean(seconds[name]):7.1f} +- {1000 * statistics.stdev(seconds[name]):5.1f}"
            f" ms forward + backward, peak {peaks[name] / 2**20:7.1f} MB"
        )
    ratio = [c / w for c, w in zip(seconds["chunked"], seconds["whole"])]
    print(f"time chunked / whole: {statistics.mean(ratio):.3f} +- {statistics.stdev(ratio):.3f}")
    difference = (values["chunked"][1] - values["whole"][1]).norm() / values["whole"][1].norm()
    print(f"loss {values['chunked'][0]:.6f} vs {values['whole'][0]:.6f}; gradient relative difference {difference:.1e}")


if __name__ == "__main__":
    fire.Fire(main)
