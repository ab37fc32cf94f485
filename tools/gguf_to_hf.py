"""A GGUF model file (llama.cpp's format) as a Hugging Face directory: dequantised weights, config, tokenizer.

    python tools/gguf_to_hf.py SRC.gguf OUT_DIR [--dtype=float32]

The directory loads with `from_pretrained` and serves as a ds_distill teacher or student like any other. A run
can also name the file directly (`teacher: {model_name_or_path: DIR, gguf_file: NAME.gguf}`), which converts it
once per machine into a cache.
"""

from __future__ import annotations

import sys
from pathlib import Path

import fire
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ds_distill.models.gguf import convert  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(source: str, output_dir: str, dtype: str = "float32") -> None:
    """Converts SOURCE (a .gguf file) into OUTPUT_DIR (replaced if it exists)."""
    path = Path(source)
    if not path.is_file():
        raise SystemExit(f"error: {source} is not a file")
    if dtype not in DTYPES:
        raise SystemExit(f"error: dtype {dtype} is unknown; choose one of {', '.join(DTYPES)}")
    convert(str(path.parent), path.name, Path(output_dir), DTYPES[dtype])
    print(f"wrote {output_dir}")


if __name__ == "__main__":
    fire.Fire(main)
