"""One-kernel equivalents of eager modules that cost memory traffic rather than arithmetic.

Hugging Face writes the RMS norms of T5 and the Llama family, and the tanh-approximated GELU of T5 v1.1 and
GPT-2 (`gelu_new`), as chains of elementwise operations: five or six kernels each, every one a pass over the
activations. On a GPU those passes, not the matrix products, took most of a Flan-T5-XL teacher's forward
(bench/RESULTS.md). `use_fused_kernels` points such modules at `F.rms_norm` and `F.gelu(approximate="tanh")`,
the same functions computed in one kernel (equal to the eager result in float32 up to rounding). Parameters
and their names are untouched, so checkpoints, exports, hooks and ZeRO-3 partitioning see the same model.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

# Classes whose forward is `weight * x / sqrt(mean(x^2) + variance_epsilon)` with float32 statistics.
RMS_NORMS = ("T5LayerNorm", "LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm")
# Classes whose forward is 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))).
TANH_GELUS = ("NewGELUActivation",)


def _rms_norm(self, hidden: torch.Tensor) -> torch.Tensor:
    if hidden.dtype != self.weight.dtype:  # mixed dtypes: the eager rules for the result's dtype apply
        return type(self).forward(self, hidden)
    return F.rms_norm(hidden, (hidden.shape[-1],), self.weight, self.variance_epsilon)


def _tanh_gelu(self, hidden: torch.Tensor) -> torch.Tensor:
    return F.gelu(hidden, approximate="tanh")


def use_fused_kernels(model: torch.nn.Module) -> int:
    """Points the model's RMS norms and tanh GELUs at fused kernels, in place; returns how many it changed."""
    changed = 0
    for module in model.modules():
        name = type(module).__name__
        if name in RMS_NORMS:
            module.forward = types.MethodType(_rms_norm, module)
        elif name in TANH_GELUS:
            module.forward = types.MethodType(_tanh_gelu, module)
        else:
            continue
        changed += 1
    return changed
