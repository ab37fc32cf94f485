"""GGUF checkpoints (llama.cpp's format, in which many small open models ship) as Hugging Face directories.

transformers reads a GGUF file and dequantises its tensors (`from_pretrained(..., gguf_file=...)`); the model it
returns is marked as quantised and will not save, so its dequantised weights go into a plain model of the same
config, which saves as any other. A teacher given as `teacher: {model_name_or_path: DIR_OR_HUB_ID, gguf_file:
NAME.gguf}` is converted once per machine into a cache (`DS_DISTILL_CACHE`, default ~/.cache/ds_distill):

    python tools/gguf_to_hf.py SRC.gguf OUT_DIR       # the same conversion, into a directory of your choice
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch
from filelock import FileLock

from ds_distill.config.run import TeacherConfig
from ds_distill.errors import ConfigError


def convert(directory: str, gguf_file: str, output_dir: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Writes the GGUF model `directory/gguf_file` (a directory or hub id) as a Hugging Face directory."""
    from transformers import AutoConfig, AutoTokenizer

    from ds_distill.models.adapters import adapter_for

    try:
        config = AutoConfig.from_pretrained(directory, gguf_file=gguf_file)
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read {gguf_file} in {directory} as GGUF: {str(error).splitlines()[0]}") from None
    adapter = adapter_for(config)
    quantized = adapter.model_class(config).from_pretrained(directory, gguf_file=gguf_file, dtype=dtype)
    with torch.device("meta"):
        model = adapter.from_config(config)
    model.load_state_dict(quantized.state_dict(), assign=True)
    model.tie_weights()
    staging = output_dir.with_name(output_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.to(dtype).save_pretrained(staging)
    AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file).save_pretrained(staging)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    staging.rename(output_dir)
    return output_dir


def teacher_weights(teacher: TeacherConfig) -> str | None:
    """What to load as the teacher: `teacher.model_name_or_path`, or the Hugging Face directory its GGUF file
    (`teacher.gguf_file`) converts to."""
    return resolve(teacher.model_name_or_path, teacher.gguf_file)


def resolve(model_name_or_path: str | None, gguf_file: str | None) -> str | None:
    """The Hugging Face directory to load: `model_name_or_path` itself, or its GGUF file converted once per
    machine (whichever process comes first converts while the others wait; later runs find the cache)."""
    if not gguf_file or not model_name_or_path:
        return model_name_or_path
    from transformers.utils import cached_file

    source = cached_file(model_name_or_path, gguf_file, _raise_exceptions_for_missing_entries=False)
    if source is None:
        raise ConfigError(f"teacher.gguf_file {gguf_file} is not in {model_name_or_path}")
    stat = os.stat(source)
    key = hashlib.sha256(f"{os.path.realpath(source)}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = Path(os.environ.get("DS_DISTILL_CACHE", "~/.cache/ds_distill")).expanduser()
    target = cache / "gguf" / f"{Path(gguf_file).stem}-{key}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # the first process converts, the others wait and find it done
        if not (target / "config.json").is_file():
            print(f"converting {source} into {target} (once per machine)", flush=True)
            convert(model_name_or_path, gguf_file, target)
    return str(target)
