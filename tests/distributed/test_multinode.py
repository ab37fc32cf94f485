"""Two nodes simulated on one machine: one DeepSpeed launcher per node (`--no_ssh`, node ranks 0 and 1, one rank
each), as launch_scripts/multinode_slurm.sh starts them, train as one node with two ranks does."""

from __future__ import annotations

import subprocess

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, subprocess_env, translation_config, write_yaml
from tests.distributed.launch import distill, free_port, losses

pytestmark = pytest.mark.distributed


def test_two_single_rank_nodes_without_ssh_equal_one_node_with_two_ranks(tiny, tmp_path):
    one_node = distill(tmp_path, "one_node", translation_config(tiny, tmp_path / "one_node"))

    config = write_yaml(tmp_path / "two_nodes.yaml", translation_config(tiny, tmp_path / "two_nodes"))
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")  # no ssh: the names only count the nodes
    port = str(free_port())
    launchers = []
    for node_rank in (0, 1):
        command = ["deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node_rank),
                   "--master_addr", "127.0.0.1", "--master_port", port,
                   "--module", "ds_distill", "distill", f"--config={config}"]  # fmt: skip
        log = open(tmp_path / f"node{node_rank}.log", "w")
        launchers.append((subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=log, stderr=log), log))
    for process, log in launchers:
        assert process.wait(timeout=600) == 0, open(log.name).read()[-4000:]
        log.close()
    node_1 = (tmp_path / "node1.log").read_text()
    assert "nnodes=2, num_local_procs=1, node_rank=1" in node_1 and "dist_world_size=2" in node_1

    two_nodes = tmp_path / "two_nodes"
    assert losses(two_nodes) == pytest.approx(losses(one_node), rel=1e-5)
    exported = [load_file(path / "model" / "model.safetensors") for path in (tmp_path / "one_node", two_nodes)]
    for name, tensor in exported[0].items():
        torch.testing.assert_close(exported[1][name], tensor, rtol=1e-5, atol=1e-6)
