"""The teacher: frozen, in eval mode, under its own DeepSpeed engine with no optimizer (ZeRO-Inference).

With a ZeRO-3 config the weights are partitioned while they load, so no rank ever holds the whole teacher,
and `offload_param` keeps them in CPU memory or on NVMe between uses. `deepspeed.init_inference` would
ignore the ZeRO settings, so the teacher goes through `deepspeed.initialize` like the DeepSpeed-Chat
reference model does.
"""

from __future__ import annotations

from typing import Any

import torch

from ds_distill import dist, models
from ds_distill.config.deepspeed import model_dtype, zero3_loading, zero_stage
from ds_distill.objectives.capture import FeatureCapture
from ds_distill.objectives.features import forward_features, teacher_view


def load_teacher(model_name_or_path: str, ds_config: dict[str, Any]):
    """Returns the teacher's DeepSpeed engine, ready for `with torch.no_grad(): engine(**inputs)`."""
    import deepspeed

    adapter = models.adapter_for(models.load_config(model_name_or_path, "teacher"))
    with zero3_loading(ds_config):
        model = adapter.from_pretrained(model_name_or_path, "teacher", dtype=model_dtype(ds_config))
    model.eval().requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.eval()
    return engine


class TeacherFeatures:
    """The teacher's side of a step: `features(batch)` runs the frozen teacher under no_grad and returns what the
    loss terms read (logits, masks and the captured features of the mapped layers)."""

    def __init__(self, engine, ds_config: dict[str, Any], keys: set[str], compile: bool):
        self.engine = engine
        self.adapter = models.adapter_for(engine.module.config)
        self.capture = FeatureCapture(engine.module, self.adapter, keys)
        self.forward = engine
        if compile:
            # graphs compiled earlier in this process (a reused teacher) would ignore the hooks added above
            torch.compiler.reset()
            if zero_stage(ds_config) < 3:
                self.forward = torch.compile(engine.module)
            else:
                dist.print_main("train.torch_compile: the ZeRO-3 teacher runs eagerly (weights gathered per module)")

    @torch.no_grad()
    def features(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return forward_features(self.forward, self.adapter, teacher_view(batch), self.capture)
