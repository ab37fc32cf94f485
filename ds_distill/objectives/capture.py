"""Forward hooks that collect only the features the losses ask for, on one Hugging Face model.

A feature key is `"{stack}.{layer}.{site}"`, e.g. `encoder.0.hidden` (the embeddings' output) or
`decoder.6.cross_k`; sites are listed in `models/layouts.py`. Hooks sit on the mapped layers' modules only,
so memory grows with the layer map, not with depth. They work on ZeRO-3-partitioned models (activations
are full size; no weight is gathered) and under non-reentrant gradient checkpointing: the blocks that run
again during backward do so outside `recording()`, so they store nothing, and gradients flow into the
features captured by the first forward.

    capture = FeatureCapture(model, adapter, {"encoder.2.hidden", "decoder.2.self_q"})
    with capture.recording():
        model(**inputs)
    features = capture.pop()

Outside `recording()` the hooks store nothing (evaluation and generation run the same modules).
"""

from __future__ import annotations

import contextlib

import torch

from ds_distill.errors import ConfigError
from ds_distill.models import ModelAdapter
from ds_distill.models.layouts import Site
from ds_distill.objectives.probabilities import use_probabilities


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
            f"{key}: the model returned no value here; attention probabilities need the math path, which "
            "FeatureCapture switches on (was the implementation changed after it was built?)"
        )
    if site.chunk is not None:
        part, parts = site.chunk
        value = value.chunk(parts, dim=-1)[part]
    return value


def hook_site(module: torch.nn.Module, site: Site, key: str, receive) -> torch.utils.hooks.RemovableHandle:
    """Calls `receive(tensor)` with the feature `site` reads from `module` on every forward."""
    if site.read == "input":
        return module.register_forward_pre_hook(
            lambda m, args, kwargs: receive(_read(args[0] if args else kwargs["hidden_states"], site, key)),
            with_kwargs=True,
        )
    return module.register_forward_hook(lambda m, args, output: receive(_read(output, site, key)))


def _switch_off_dropout(module: torch.nn.Module, attribute: str) -> None:
    """Dropout on attention probabilities would hand the losses zeroed, rescaled distributions."""
    dropout = getattr(module, attribute)
    if isinstance(dropout, torch.nn.Dropout):
        dropout.p = 0.0
    else:
        setattr(module, attribute, 0.0)


class FeatureCapture:
    """Hooks for a fixed set of feature keys; `pop()` hands over what the last forward captured."""

    def __init__(self, model: torch.nn.Module, adapter: ModelAdapter, keys: set[str]):
        self.features: dict[str, torch.Tensor] = {}
        self.handles = []
        self.active = False
        layerdrop = {a: getattr(model.config, a, 0) for a in ("layerdrop", "encoder_layerdrop", "decoder_layerdrop")}
        if keys and any(layerdrop.values()):
            raise ConfigError(
                f"layer-wise losses need every block to run, but the model skips blocks at random ({layerdrop}); "
                "set its layerdrop to 0 in config.json"
            )
        # fused attention never forms the probabilities: the layers whose probabilities a loss reads compute them
        probability_keys = sorted(key for key in keys if parse_key(key)[2] == "attention_probs")
        if probability_keys:
            use_probabilities(model, [adapter.site(model, *parse_key(key))[0] for key in probability_keys])
        for key in sorted(keys):
            module, site = adapter.site(model, *parse_key(key))
            if site.dropout:
                _switch_off_dropout(module, site.dropout)
            self.handles.append(self._hook(module, site, key))

    def _hook(self, module: torch.nn.Module, site: Site, key: str):
        def store(feature: torch.Tensor) -> None:
            if self.active:
                self.features[key] = feature

        return hook_site(module, site, key, store)

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
