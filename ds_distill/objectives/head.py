"""The student's LM head folded into the logit terms: logits made from the last hidden state, a chunk at a time.

A step's student logits and their gradient are two `[batch, tokens, vocabulary]` tensors (0.4 GB per 2048-token
example of a 49k vocabulary in bf16), though the logit terms read them one chunk of target rows at a time. While
`folded` is open, a stand-in without weights takes the head's (`get_output_embeddings()`) place in the model and
returns its input, so the Hugging Face forward ends at the hidden state the head would read; the logit terms
then call the head on that state with their chunk pass (`logits.TargetRows`), which makes each chunk's logits
from its rows and sums the head's gradients. The head itself is called once per forward, as a module, so
ZeRO-3 gathers its weight once for the chunk pass and once for its backward, and releases it after each as for
any module (were the head called inside the model too, returning its input, DeepSpeed's hooks would gather it
twice each way and leave the vocabulary x d_model weight gathered until the next forward).

A family whose forward adds a bias after the head (BART's `final_logits_bias`) names it in its adapter
(`ModelAdapter.logits_bias`); the fold adds it to the head's. Evaluation and generation, which call the student
outside `folded`, get the ordinary head.
"""

from __future__ import annotations

import contextlib
import types

import torch

from ds_distill import models
from ds_distill.objectives.logits import TargetRows


def _forward(self, hidden: torch.Tensor, *chunk_pass) -> torch.Tensor:
    """`hidden` [..., d_model] -> the logits; with the chunk pass's arguments (`logit_terms`): its (total, term
    sums) over the target rows of `hidden`."""
    if chunk_pass:
        bias = self.bias
        if self.bias_after is not None:
            after = self.bias_after.value().reshape(-1).to(self.weight.dtype)
            bias = after if bias is None else bias + after
        return TargetRows.apply(hidden, *chunk_pass, self.weight, bias)
    return type(self).forward(self, hidden)


class _StandIn(torch.nn.Module):
    """In the head's place while folded: the hidden state passes through. Made after DeepSpeed's engine has
    hooked the model's modules, or before it, it holds no weights, so ZeRO-3 has nothing to gather for it."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


class _BiasAfter:
    """A bias buffer the model's forward adds to the head's output: a zero of one element stands in for it while
    the head is folded (so `hidden + bias` broadcasts), and the chunk pass adds the real one."""

    def __init__(self, model: torch.nn.Module, name: str):
        self.model, self.name, self.saved = model, name, None

    def value(self) -> torch.Tensor:
        return self.saved if self.saved is not None else getattr(self.model, self.name)

    def stand_in(self, on: bool) -> None:
        if on:
            self.saved = getattr(self.model, self.name)
            setattr(self.model, self.name, self.saved.new_zeros(1))
        else:
            setattr(self.model, self.name, self.saved)
            self.saved = None


def fold_head(model: torch.nn.Module, adapter: models.ModelAdapter) -> torch.nn.Linear | None:
    """Makes the model's LM head foldable (in place; it computes as before outside `folded`) and returns it;
    None for a model without a linear head (a bare encoder)."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return None
    name = next((name for name, module in model.named_modules() if module is head), None)
    if name is None:  # a head outside the module tree: nothing to stand in for it, so the logits stay whole
        return None
    parent, _, attribute = name.rpartition(".")
    # kept out of the module tree: DeepSpeed's hooks and a checkpoint see the head once, in its own place
    head.__dict__["place"] = (model.get_submodule(parent), attribute, _StandIn())
    head.bias_after = _BiasAfter(model, adapter.logits_bias) if adapter.logits_bias else None
    head.forward = types.MethodType(_forward, head)
    return head


@contextlib.contextmanager
def folded(head: torch.nn.Linear | None):
    """While open, the model's forward ends at the input of `head` (from `fold_head`; None: nothing to fold)."""
    if head is None:
        yield
        return
    parent, attribute, stand_in = head.place
    setattr(parent, attribute, stand_in)
    if head.bias_after is not None:
        head.bias_after.stand_in(True)
    try:
        yield
    finally:
        setattr(parent, attribute, head)
        if head.bias_after is not None:
            head.bias_after.stand_in(False)
