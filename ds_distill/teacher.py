"""The teacher: frozen, in eval mode, under its own DeepSpeed engine with no optimizer (ZeRO-Inference).

With a ZeRO-3 config the weights are partitioned while they load, so no rank ever holds the whole teacher,
and `offload_param` keeps them in CPU memory or on NVMe between uses. `deepspeed.init_inference` would
ignore the ZeRO settings, so the teacher goes through `deepspeed.initialize` like the DeepSpeed-Chat
reference model does.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from transformers.integrations import HfDeepSpeedConfig
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from ds_distill import models
from ds_distill.ds_config import zero_stage


@contextlib.contextmanager
def zero3_loading(ds_config: dict[str, Any]):
    """While open, `from_pretrained`/`from_config` build ZeRO-3-partitioned models.

    The Hugging Face switch is process-wide, so it is closed again before anything else is built (a ZeRO-2
    student built while it is on crashes with "'weight' must be 2-D").
    """
    if zero_stage(ds_config) != 3:
        yield
        return
    switch = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        del switch
        unset_hf_deepspeed_config()


def model_dtype(ds_config: dict[str, Any]) -> torch.dtype:
    return torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32


def load_teacher(model_name_or_path: str, ds_config: dict[str, Any]):
    """Returns the teacher's DeepSpeed engine, ready for `with torch.no_grad(): engine(**inputs)`."""
    import deepspeed

    adapter = models.adapter_for(models.load_config(model_name_or_path, "teacher"))
    with zero3_loading(ds_config):
        model = adapter.from_pretrained(model_name_or_path, dtype=model_dtype(ds_config))
    model.eval().requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.eval()
    return engine
