"""`sbatch launch_scripts/multinode_slurm.sh` on the local cluster's two SLURM nodes, CPU settings through the
environment, as a user submits it from the repository root."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.conftest import REPO, translation_config, write_yaml
from tests.multinode.conftest import assert_same_run, cluster_env

pytestmark = pytest.mark.multinode


def slurm(env: dict, *command: str) -> str:
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_sbatch_runs_a_distillation_on_two_nodes_as_one_node_with_two_ranks(cluster, tiny, one_node, tmp_path):
    config = write_yaml(tmp_path / "run.yaml", translation_config(tiny, tmp_path / "run"))
    env = cluster_env(cluster, tmp_path, CONFIG=str(config), GPUS_PER_NODE="1", SBATCH_GPUS_PER_NODE="0",
                      SLURM_CONF=cluster["SLURM_CONF"])  # fmt: skip
    job = slurm(env, "sbatch", "--parsable", "launch_scripts/multinode_slurm.sh").strip().split(";")[0]
    log = REPO / f"ds_distill-{job}.out"  # the script's --output=%x-%j.out, in the directory sbatch ran in
    try:
        deadline = time.time() + 600
        while slurm(env, "squeue", "-h", "-j", job).strip() and time.time() < deadline:
            time.sleep(1)
        assert not slurm(env, "squeue", "-h", "-j", job).strip(), "the job did not end in 600 s"
        state = slurm(env, "scontrol", "show", "job", job)
        output = log.read_text()
        assert "JobState=COMPLETED" in state and "ExitCode=0:0" in state, state + output[-4000:]
    finally:
        log.unlink(missing_ok=True)
    assert "NodeList=ds-distill-node[0-1]" in state  # two SLURM nodes, one launcher each
    assert "nnodes=2, num_local_procs=1, node_rank=1" in output and "dist_world_size=2" in output
    assert (tmp_path / "run.log").read_text() == output  # every launcher's output, also beside the run
    assert_same_run(tmp_path / "run", one_node)  # as one node with two ranks
