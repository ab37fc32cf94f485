"""Models: one adapter per architecture family (adapters.py, with the feature sites of each family in
layouts.py, and of its width spaces in spaces.py), reading configs and checkpoint names without weights (hub.py),
fused kernels (fused.py), T5 v1.1's separate head (t5.py) and GGUF teachers (gguf.py). The names below are what
the rest of the package uses."""

from ds_distill.models.adapters import ADAPTERS, DIMENSIONS, ModelAdapter, adapter_for, count_parameters
from ds_distill.models.gguf import teacher_weights
from ds_distill.models.hub import check_local_weights, checkpoint_keys, load_config, quiet_saving

__all__ = [
    "ADAPTERS",
    "DIMENSIONS",
    "ModelAdapter",
    "adapter_for",
    "check_local_weights",
    "checkpoint_keys",
    "count_parameters",
    "load_config",
    "quiet_saving",
    "teacher_weights",
]
