"""The teacher: frozen, in eval mode, under its own DeepSpeed engine with no optimizer (ZeRO-Inference).

With a ZeRO-3 config the weights are partitioned while they load, so no rank ever holds the whole teacher,
and `offload_param` keeps them in CPU memory or on NVMe between uses. `deepspeed.init_inference` would
ignore the ZeRO settings, so the teacher goes through `deepspeed.initialize` like the DeepSpeed-Chat
reference model does.
"""

from __future__ import annotations

from typing import Any

from ds_distill import models
from ds_distill.config.deepspeed import model_dtype, zero3_loading


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
