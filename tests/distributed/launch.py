"""Launching real 2-rank CPU runs from tests and reading what they wrote."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.conftest import REPO, subprocess_env, write_yaml


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deepspeed_command(config: Path, *flags: str, verb: str = "distill") -> list[str]:
    """`deepspeed --num_gpus 2 ... --module ds_distill VERB --config=CONFIG FLAGS` on a free port."""
    port = str(free_port())
    return ["deepspeed", "--num_gpus", "2", "--master_port", port, "--module", "ds_distill", verb, f"--config={config}",
            *flags]  # fmt: skip


def shared_memory_left(command: list[str]) -> list[Path]:
    """DeepSpeed CPU all-reduce buffers a launch left in /dev/shm (each rank's holds 69 MB of RAM)."""
    port = command[command.index("--master_port") + 1]
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def launch(command: list[str], log: Path) -> None:
    with open(log, "w") as out:
        result = subprocess.run(
            command, cwd=REPO, env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT, timeout=600
        )
    output = log.read_text()
    assert result.returncode == 0, output[-4000:]
    assert "terminate called" not in output and "Aborted" not in output, output[-4000:]  # every rank ended cleanly
    assert not shared_memory_left(command)


def distill(tmp_path: Path, name: str, config: dict, *flags: str) -> Path:
    path = write_yaml(tmp_path / f"{name}.yaml", config)
    launch(deepspeed_command(path, *flags), tmp_path / f"{name}.log")
    return Path(config["train"]["output_dir"])


def training_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in open(run_dir / "log.jsonl")]


def losses(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in training_log(run_dir) if "loss" in row}


def distill_until_first_checkpoint(tmp_path: Path, name: str, config: dict, student: str | None = None) -> Path:
    """Starts a run and kill -9s all its ranks as soon as its first checkpoint (`student`'s, of a run with
    several) is complete; returns output_dir."""
    run_dir = Path(config["train"]["output_dir"]) / (student or "")
    path = write_yaml(tmp_path / f"{name}.yaml", config)
    with open(tmp_path / f"{name}.log", "w") as out:
        command = deepspeed_command(path)
        process = subprocess.Popen(
            command, cwd=REPO, env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.time() + 300
        while not (run_dir / "checkpoints" / "latest").exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not (run_dir / "model").exists(), "the run finished before it could be killed"
    assert not shared_memory_left(command)  # released while the ranks ran, so kill -9 leaks none either
    return run_dir
