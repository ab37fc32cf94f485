"""bf16 gradients of accumulated micro-batches are summed in fp32 (the shipped student configs' setting): the
accumulated step lands nearer the one-micro-batch step than with bf16 sums, and stays as near however many
micro-batches it has. One CPU rank, ZeRO-2, in this process; `bench/grad_accum_dtype.py` prints the numbers."""

import pytest
import torch

from bench.grad_accum_dtype import SAMPLES, SEQUENCE_TOKENS, VOCABULARY, gaps, step_gradient
from ds_distill import dist

pytestmark = pytest.mark.distributed


def test_fp32_accumulation_brings_accumulated_bf16_steps_nearer_one_micro_batch():
    dist.init()
    torch.manual_seed(0)
    samples = torch.randint(0, VOCABULARY, (SAMPLES, SEQUENCE_TOKENS))
    gap = {}
    for dtype in (None, "fp32"):
        reference = step_gradient(samples, 8, 1, dtype)
        for micro_batch, accumulation in ((4, 2), (1, 8)):
            gap[dtype, accumulation] = gaps(step_gradient(samples, micro_batch, accumulation, dtype), reference)[0]
    assert gap["fp32", 2] < gap[None, 2], gap
    assert gap["fp32", 8] < 0.75 * gap[None, 8], gap  # bf16 sums drift further with every micro-batch
    assert gap["fp32", 8] < 1.2 * gap["fp32", 2], gap  # fp32 sums do not
