"""Two "nodes" over ssh: the local cluster's two host names, DeepSpeed's pdsh runner and a hostfile, as a user
launches with launch_scripts/multinode_hostfile.sh and HOSTFILE=... for the recipe scripts. They train as one
node with two ranks does; when one node is killed, the other stops within three peer timeouts (the ranks name a
rank lost after `PEER_TIMEOUT_S` of silence) naming the lost rank, and the same command run again resumes from
the newest complete checkpoint."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from ds_distill.chain import tree_hash
from tests.conftest import REPO, translation_config, write_yaml
from tests.distributed.test_chain import chain_config, sliced
from tests.multinode.conftest import PEER_TIMEOUT_S, assert_same_run, cluster_env, node_processes

pytestmark = pytest.mark.multinode


def launch(script: str, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(["bash", script], cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def kill(processes) -> float:
    for process in processes:
        process.kill()
    return time.monotonic()


def test_two_nodes_over_ssh_train_as_one_node_with_two_ranks(cluster, tiny, one_node, tmp_path):
    """The recipe script with HOSTFILE= and CONFIG= (multinode_hostfile.sh runs in the next test)."""
    config = write_yaml(tmp_path / "run.yaml", translation_config(tiny, tmp_path / "run"))
    process = launch("launch_scripts/flan_t5_3b.sh", cluster_env(cluster, tmp_path, CONFIG=str(config)),
                     tmp_path / "stdout.log")  # fmt: skip
    assert process.wait(timeout=600) == 0, (tmp_path / "stdout.log").read_text()[-4000:]
    log = (tmp_path / "stdout.log").read_text()
    assert "cmd = pdsh" in log and "ds-distill-node1: " in log  # through ssh, each line prefixed by its node
    assert (tmp_path / "run.log").read_text() == log  # the script keeps the launcher's output beside the run
    assert_same_run(tmp_path / "run", one_node)


def test_a_lost_node_stops_the_other_within_3_peer_timeouts_naming_it_and_the_rerun_resumes(
    cluster, tiny, one_node, tmp_path
):
    config = write_yaml(tmp_path / "run.yaml", translation_config(tiny, tmp_path / "run"))
    env = cluster_env(cluster, tmp_path, CONFIG=str(config))
    process = launch("launch_scripts/multinode_hostfile.sh", env, tmp_path / "killed_stdout.log")
    node_1 = node_processes(1, env["MASTER_PORT"])
    rank_env = node_1[-1].environ()  # a rank pdsh started over ssh sees .deepspeed_env, and not this shell's variables
    assert rank_env["DS_DISTILL_TEST_MARK"] == "from_deepspeed_env" and rank_env["RANK"] == "1"
    latest = tmp_path / "run" / "checkpoints" / "latest"
    while not latest.exists() and process.poll() is None:
        time.sleep(0.02)
    killed_at = kill(node_1)  # node 1's launcher and its rank, kill -9
    process.wait(timeout=300)
    waited = time.monotonic() - killed_at
    log = (tmp_path / "killed_stdout.log").read_text()
    assert process.returncode != 0 and not (tmp_path / "run" / "model").exists()
    assert "rank 0 stops: rank 1 (node 1, host " in log and "was lost" in log, log[-4000:]
    assert waited < 3 * float(PEER_TIMEOUT_S), f"the job took {waited:.0f} s to stop"

    rerun = launch("launch_scripts/multinode_hostfile.sh", {**env, "MASTER_PORT": ""}, tmp_path / "rerun_stdout.log")
    assert rerun.wait(timeout=600) == 0, (tmp_path / "rerun_stdout.log").read_text()[-4000:]
    assert "resumed from" in (log := (tmp_path / "rerun_stdout.log").read_text()) and "at step 4" in log, log[-4000:]
    assert_same_run(tmp_path / "run", one_node)


def test_a_chain_across_two_nodes_killed_in_stage_2_resumes_stage_2(cluster, tiny, tmp_path):
    """The chain script with CONFIG=, its first node (rank 0, which holds the rendezvous store) killed."""
    config = chain_config(tiny, tmp_path / "chain")
    config["stages"] = [
        {"name": "l2", "student": sliced(2, 48, 96, 3)},
        {"name": "l1", "student": sliced(1, 32, 64, 2)},
    ]
    env = cluster_env(cluster, tmp_path, CONFIG=str(write_yaml(tmp_path / "chain.yaml", config)))
    process = launch("launch_scripts/flan_t5_3b_chain.sh", env, tmp_path / "killed_stdout.log")
    latest = tmp_path / "chain" / "l1" / "checkpoints" / "latest"
    while not latest.exists() and process.poll() is None:
        time.sleep(0.02)
    killed_at = kill(node_processes(0, env["MASTER_PORT"]))
    process.wait(timeout=300)
    waited = time.monotonic() - killed_at
    log = (tmp_path / "killed_stdout.log").read_text()
    assert "rank 1 stops: rank 0 (node 0, host " in log and "the rendezvous store it holds stopped" in log, log[-4000:]
    assert waited < 3 * float(PEER_TIMEOUT_S), f"the job took {waited:.0f} s to stop"
    assert not (tmp_path / "chain" / "l1" / "model").exists()
    stage_1 = tree_hash(tmp_path / "chain" / "l2")

    rerun = launch("launch_scripts/flan_t5_3b_chain.sh", {**env, "MASTER_PORT": ""}, tmp_path / "rerun_stdout.log")
    assert rerun.wait(timeout=900) == 0, (tmp_path / "rerun_stdout.log").read_text()[-4000:]
    log = (tmp_path / "rerun_stdout.log").read_text()
    assert "stage l2 finished earlier" in log and "stage l1 (resuming)" in log
    assert tree_hash(tmp_path / "chain" / "l2") == stage_1
    assert (tmp_path / "chain" / "l1" / "model" / "model.safetensors").exists()
