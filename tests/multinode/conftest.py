"""The local cluster (tools/local_cluster.sh): brought up for these tests when it is not up, and down after them
when they brought it up."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, subprocess_env
from tests.distributed.launch import free_port, losses

SCRIPT = ["bash", "tools/local_cluster.sh"]


@pytest.fixture(scope="session")
def cluster() -> dict[str, str]:
    """{'HOSTFILE': ..., 'SLURM_CONF': ...} of a running local cluster: two ssh host names, two SLURM nodes."""
    up_already = subprocess.run([*SCRIPT, "status"], cwd=REPO, capture_output=True, text=True).returncode == 0
    if not up_already and os.geteuid() != 0:
        pytest.skip("the local cluster is not up, and bringing it up needs root (sudo bash tools/local_cluster.sh up)")
    result = subprocess.run([*SCRIPT, "up"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    assert result.stdout.splitlines()[-1].startswith("HOSTFILE=")  # `up` ends with the hostfile's path
    yield {"HOSTFILE": lines["HOSTFILE"], "SLURM_CONF": lines["SLURM_CONF"]}
    if not up_already:
        down = subprocess.run([*SCRIPT, "down"], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr


@pytest.fixture
def one_node(t5_zero2) -> Path:
    """The reference: one node with two ranks (the shared `t5_zero2` run; these runs skip its BLEU)."""
    return t5_zero2.dir


PEER_TIMEOUT_S = "10"
"""A lost rank is named after 10 s of silence here, not the default 30 (ds_distill/peers.py)."""


def cluster_env(cluster: dict, tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment a user launches with: the hostfile, a .deepspeed_env for the remote ranks (CPU, one thread,
    offline, a short peer timeout, and a marker a test looks for in the ranks' environment), and a known
    MASTER_PORT."""
    env_file = tmp_path / ".deepspeed_env"
    env_file.write_text(
        "DS_ACCELERATOR=cpu\nOMP_NUM_THREADS=1\nHF_HUB_OFFLINE=1\nTOKENIZERS_PARALLELISM=false\n"
        f"DS_DISTILL_PEER_TIMEOUT={PEER_TIMEOUT_S}\nDS_DISTILL_TEST_MARK=from_deepspeed_env\n"
    )
    return {**subprocess_env(), **cluster, "DS_ENV_FILE": str(env_file), "MASTER_PORT": str(free_port()),
            "DS_DISTILL_PEER_TIMEOUT": PEER_TIMEOUT_S, **extra}  # fmt: skip


def node_processes(node_rank: int, master_port: str, timeout: float = 120) -> list[psutil.Process]:
    """The DeepSpeed launcher of one "node" of a job (the one pdsh or srun started with --node_rank N) and its
    ranks, once the ranks exist."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for process in psutil.process_iter(["name", "cmdline"]):
            cmdline = process.info["cmdline"] or []
            if (process.info["name"] or "").startswith("python") and "deepspeed.launcher.launch" in cmdline and \
                    f"--node_rank={node_rank}" in cmdline and f"--master_port={master_port}" in cmdline:  # fmt: skip
                ranks = process.children(recursive=True)
                if ranks:
                    return [process, *ranks]
        time.sleep(0.1)
    raise AssertionError(f"no launcher with --node_rank={node_rank} on port {master_port}")


def assert_same_run(run: Path, reference: Path) -> None:
    assert losses(run) == pytest.approx(losses(reference), rel=1e-5)
    exported = [load_file(path / "model" / "model.safetensors") for path in (reference, run)]
    for name, tensor in exported[0].items():
        torch.testing.assert_close(exported[1][name], tensor, rtol=1e-5, atol=1e-6)
