"""The peak memory of one training step, traced on the CPU: what `ds-distill plan` counts as "step".

The student runs its real forward, its logit losses (with the teacher's logits held, as in training) and its
backward inside `LiveTensorBytes`, which counts the bytes of tensor storage alive at each op. Two shallow copies
(one and two blocks per stack) at batch 1 and 2 give a peak that grows linearly in depth and micro-batch, so a
3B-class run is planned in seconds:

    step = step_memory(student_config, adapter, step_shape(run, adapter, vocab), logit_losses, weights, (32128, bf16))
    step.at(micro_batch)   # bytes

Where a CPU kernel holds other memory than its CUDA counterpart (attention, RMS norm, dropout), `gpu_kernels()`
swaps in stand-ins that hold what the CUDA kernel holds (`StepShape.gpu`).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ds_distill import models
from ds_distill.config.run import FromTeacherConfig, RunConfig


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of tensor storage that ops inside it create and that are still alive, and their peak.

    Storages that exist before (weights: give them to `exclude`) are not counted; a view is counted with its
    storage, once. 16-bit matrix products run in float32 and are cast back, because many CPUs compute them
    slowly; the result's bytes are the same.
    """

    _PRODUCTS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen = weakref.WeakSet()

    def exclude(self, tensors) -> None:
        for tensor in tensors:
            self._seen.add(tensor.untyped_storage())

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        half = (torch.bfloat16, torch.float16)
        if func in self._PRODUCTS and any(isinstance(a, torch.Tensor) and a.dtype in half for a in args):
            dtype = next(a.dtype for a in args if isinstance(a, torch.Tensor))
            out = func(*[a.float() if isinstance(a, torch.Tensor) else a for a in args], **kwargs).to(dtype)
        else:
            out = func(*args, **kwargs)
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            if storage in self._seen or storage.nbytes() == 0:
                continue
            self._seen.add(storage)
            self.live += storage.nbytes()
            weakref.finalize(storage, self._freed, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


class _FusedAttention(torch.autograd.Function):
    """Scaled dot-product attention that keeps for backward what CUDA's fused kernels keep (inputs, output and
    a float32 log-sum-exp per query), not the probabilities, scores and dropout mask of the CPU's math path."""

    @staticmethod
    def forward(ctx, query, key, value, mask, is_causal, scale, enable_gqa):
        ctx.options = {"is_causal": is_causal, "scale": scale, "enable_gqa": enable_gqa}
        out = _SDPA(query, key, value, attn_mask=mask, **ctx.options)
        log_sum_exp = torch.empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, mask, out, log_sum_exp)
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, mask, _, _ = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in (query, key, value, mask) if t is not None]
        with torch.enable_grad():
            out = _SDPA(*inputs[:3], attn_mask=inputs[3] if mask is not None else None, **ctx.options)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
        result = [next(grads) if t.requires_grad else None for t in inputs]
        if mask is None:
            result.append(None)
        return (*result, None, None, None)


class _FusedRMSNorm(torch.autograd.Function):
    """RMS norm that keeps what CUDA's fused kernel keeps (input, weight, a float32 rstd per row), not the
    float32 copies of the CPU's composite one."""

    @staticmethod
    def forward(ctx, hidden, shape, weight, eps):
        ctx.options = (shape, eps)
        rstd = torch.empty(hidden.shape[:-1] + (1,), dtype=torch.float32)
        ctx.save_for_backward(hidden, weight, rstd)
        return _RMS_NORM(hidden, shape, weight, eps)

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, _ = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in (hidden, weight) if t is not None]
        with torch.enable_grad():
            out = _RMS_NORM(inputs[0], ctx.options[0], inputs[1] if weight is not None else None, ctx.options[1])
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
        hidden_grad, *rest = [next(grads) if t.requires_grad else None for t in inputs]
        return hidden_grad, None, rest[0] if rest else None, None


_SDPA = torch.nn.functional.scaled_dot_product_attention
_RMS_NORM = torch.nn.functional.rms_norm


def _fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False):  # fmt: skip
    """With a float mask (T5 adds its position bias to it) attention keeps the math path's memory, probabilities
    and all: that is what an H100 held for T5 (bench/RESULTS.md, "plan vs measured"). Without one (full-length
    examples of causal models) it is assumed to take a fused kernel (not measured here)."""
    if attn_mask is not None:
        return _SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                     enable_gqa=enable_gqa)  # fmt: skip
    return _FusedAttention.apply(query, key, value, attn_mask, is_causal, scale, enable_gqa)


def _fused_rms_norm(input, normalized_shape, weight=None, eps=None):
    return _FusedRMSNorm.apply(input, normalized_shape, weight, eps)


def _fused_dropout(input, p=0.5, training=True, inplace=False):
    """CUDA's fused dropout keeps a one-byte mask; the CPU's keeps one of the input's dtype."""
    if not training or p == 0:
        return input
    return torch.native_dropout(input, p, True)[0]


@contextlib.contextmanager
def gpu_kernels():
    """While open, attention, RMS norm and dropout hold the memory their CUDA kernels hold (traces run on the
    CPU, whose kernels for them keep more)."""
    functional = torch.nn.functional
    names = ("scaled_dot_product_attention", "rms_norm", "dropout")
    saved = [getattr(functional, name) for name in names]
    for name, replacement in zip(names, (_fused_attention, _fused_rms_norm, _fused_dropout)):
        setattr(functional, name, replacement)
    try:
        yield
    finally:
        for name, original in zip(names, saved):
            setattr(functional, name, original)


@dataclass(frozen=True)
class StepShape:
    """What one training micro-step computes on, per example, and where."""

    source: int  # tokens of the encoder (or the only stack)
    target: int  # tokens of the decoder of a seq2seq model (0 otherwise)
    vocab: int  # logit rows the losses compare (the tokenizer's)
    dtype: torch.dtype
    checkpointing: bool
    gpu: bool  # trace as GPU kernels hold memory (else as the CPU's do)


def step_shape(run: RunConfig, adapter: models.ModelAdapter, vocab: int, gpu: bool = True) -> StepShape:
    dtype = torch.bfloat16 if run.train.bf16 else torch.float32
    if adapter.kind == "seq2seq":
        source, target = run.data.max_source_length, run.data.max_target_length
    else:
        source, target = run.data.block_size, 0
    return StepShape(source, target, vocab, dtype, run.train.gradient_checkpointing, gpu)


def _batch(model, adapter: models.ModelAdapter, shape: StepShape, batch: int) -> dict[str, torch.Tensor]:
    """Full-length examples (the plan is for the longest batch); token ids below the vocabulary."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, min(shape.vocab, 1000), (batch, shape.source), generator=generator)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if adapter.kind == "seq2seq":
        out["labels"] = torch.randint(2, min(shape.vocab, 1000), (batch, shape.target), generator=generator)
        out["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=out["labels"])
    else:
        out["labels"] = ids.clone()
    return out


def _zeroed_model(adapter, config) -> torch.nn.Module:
    """The model with zeros for weights: a step creates the same tensors whatever the weights hold, and drawing
    their random initial values took half of a plan's time."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = adapter.from_config(config)
    model.tie_weights()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
    return model


def trace_step(
    student_config, adapter, shape: StepShape, logit_losses: dict, weights: dict, teacher_logits: tuple | None,
    batch: int,
) -> int:  # fmt: skip
    """Peak bytes of the tensors one training micro-step creates: teacher logits held, student forward, logit
    losses, backward (weight gradients excluded: DeepSpeed moves them into its own buffers, counted with the
    student's states)."""
    from ds_distill.objectives.features import forward_features, token_counts
    from ds_distill.objectives.head import fold_head
    from ds_distill.objectives.registry import weighted_terms

    model = _zeroed_model(adapter, student_config).to(shape.dtype).train()
    if shape.checkpointing:  # as the trainer turns it on
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    inputs = _batch(model, adapter, shape, batch)
    counts = token_counts(adapter, inputs)
    embedded = []
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            module.register_forward_hook(lambda module, args, output: embedded.append(output))
    tracker = LiveTensorBytes()
    tracker.exclude(list(model.parameters()) + list(model.buffers()) + list(inputs.values()))
    with gpu_kernels() if shape.gpu else contextlib.nullcontext(), tracker:
        teacher = None
        if teacher_logits is not None:  # computed before the student's forward, held until its loss
            vocab, dtype = teacher_logits
            length = shape.target or shape.source
            teacher = {"logits": torch.zeros(batch, length, vocab, dtype=dtype)}
            if adapter.kind == "causal":
                teacher["logits"] = teacher["logits"][:, :-1]
        student = forward_features(model, adapter, inputs, head=fold_head(model, adapter))
        if logit_losses:
            total, _ = weighted_terms(logit_losses, weights, student, teacher, counts)
        else:  # layer-wise terms only: a stand-in that keeps the whole graph (the head's input where it is folded)
            last = next((student[key] for key in ("logits", "head_input") if key in student), next(iter(embedded)))
            total = last.float().mean()
        del teacher, student
        torch.autograd.grad(total, [e for e in embedded if e.requires_grad], allow_unused=True)
    return tracker.peak


@dataclass
class StepMemory:
    """Peak step memory as `fixed + batch * per_example`, from traces of the shallow model. `fixed` holds a full
    chunk of the logit terms' rows; a micro-batch with fewer target rows than a chunk holds less of it."""

    fixed: float
    per_example: float
    chunk_row: float = 0.0  # bytes per logit row of a chunk
    chunk_rows: int = 0  # the rows of a full chunk
    targets: int = 0  # target rows per example

    def at(self, batch: int) -> float:
        unfilled = max(0, self.chunk_rows - batch * self.targets)
        return self.fixed + batch * self.per_example - self.chunk_row * unfilled


def step_memory(student_config, adapter, shape, logit_losses, weights, teacher_logits) -> StepMemory:
    """Traces one block per stack at batch 1 and 2, and two blocks in each stack in turn, then extends the
    peak linearly to the student's depth.

    The logit terms' float32 temporaries are those of one chunk of rows whatever the batch
    (`logits.current_chunk_elements()`). The traces use chunks of one example's rows, so both batches fill them; a
    trace with half as many rows per chunk gives their bytes per row, and the fixed part gets a full chunk."""
    from ds_distill.objectives import logits

    depths = adapter.depths(student_config)

    def shallow(extra_stack: str | None = None):
        dims = {f"{stack}_layers": 2 if stack == extra_stack else 1 for stack in depths}
        return adapter.shrink(student_config, FromTeacherConfig(**dims))

    def trace(config, batch):
        return trace_step(config, adapter, shape, logit_losses, weights, teacher_logits, batch)

    width = student_config.vocab_size  # the logits' rows, the tokenizer's vocabulary and any padding past it
    rows = max(1, logits.current_chunk_elements() // width)
    traced = min(rows, shape.target or shape.source - 1)
    with logits.chunk_elements(traced * width):
        one, two = trace(shallow(), 1), trace(shallow(), 2)
        per_block = {stack: trace(shallow(stack), 1) - one for stack in depths}
    per_example = two - one + sum((depths[s] - 1) * per_block[s] for s in depths)
    if not (logit_losses and rows > traced > 1):
        return StepMemory(fixed=one - (two - one), per_example=per_example)
    with logits.chunk_elements(traced // 2 * width):
        half = trace(shallow(), 1)
    chunk_row = (one - half) / (traced - traced // 2)
    fixed = one - (two - one) + chunk_row * (rows - traced)
    return StepMemory(fixed, per_example, chunk_row, rows, shape.target or shape.source - 1)
