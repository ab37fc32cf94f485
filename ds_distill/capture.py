"""Forward hooks that collect only the features the losses ask for, on one Hugging Face model.

A feature key is `"{stack}.{layer}.{site}"`, e.g. `encoder.0.hidden` (the embeddings' output) or
`decoder.6.cross_k`; sites are listed in `models/layouts.py`. Hooks sit on the mapped layers' modules only,
so memory grows with the layer map, not with depth. They work on ZeRO-3-partitioned models (activations
are full size; no weight is gathered) and under gradient checkpointing, where blocks run again during
backward: captures are stored by overwriting, so the recomputation replaces rather than appends.

    capture = FeatureCapture(model, adapter, {"encoder.2.hidden", "decoder.2.self_q"})
    with capture.recording():
        model(**inputs)
    features = capture.pop()

Outside `recording()` the hooks store nothing (evaluation and generation run the same modules).
"""

from __future__ import annotations

import contextlib

import torch

from ds_distill.models import ModelAdapter
from ds_distill.models.layouts import Site


def parse_key(key: str) -> tuple[str, int, str]:
    stack, layer, site = key.split(".")
    return stack, int(layer), site


def feature_key(stack: str, layer: int, site: str) -> str:
    return f"{stack}.{layer}.{site}"


def _read(value, site: Site, key: str) -> torch.Tensor:
    if isinstance(value, (tuple, list)):
        value = value[site.index if site.index is not None else 0]
    if value is None:
        raise RuntimeError(
            f"{key}: the model did not compute this feature; attention probabilities need eager attention "
            "(FeatureCapture switches it on when asked for attention_probs)"
        )
    if site.chunk is not None:
        part, parts = site.chunk
        value = value.chunk(parts, dim=-1)[part]
    return value


class FeatureCapture:
    """Hooks for a fixed set of feature keys; `pop()` hands over what the last forward captured."""

    def __init__(self, model: torch.nn.Module, adapter: ModelAdapter, keys: set[str]):
        self.features: dict[str, torch.Tensor] = {}
        self.handles = []
        self.active = False
        if any(parse_key(key)[2] == "attention_probs" for key in keys):
            # sdpa and flash attention never form the probabilities; eager attention returns them
            model.set_attn_implementation("eager")
        for key in sorted(keys):
            module, site = adapter.site(model, *parse_key(key))
            self.handles.append(self._hook(module, site, key))

    def _hook(self, module: torch.nn.Module, site: Site, key: str):
        if site.read == "input":

            def store_input(module, args, kwargs):
                if self.active:
                    self.features[key] = _read(args[0] if args else kwargs["hidden_states"], site, key)

            return module.register_forward_pre_hook(store_input, with_kwargs=True)

        def store_output(module, args, output):
            if self.active:
                self.features[key] = _read(output, site, key)

        return module.register_forward_hook(store_output)

    @contextlib.contextmanager
    def recording(self):
        self.active = True
        try:
            yield self
        finally:
            self.active = False

    def pop(self) -> dict[str, torch.Tensor]:
        features, self.features = self.features, {}
        return features

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
