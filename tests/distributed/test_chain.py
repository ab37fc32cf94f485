"""`ds-distill chain` on 2 CPU ranks: three tiny T5 stages, each cut from its teacher's weights (teacher -> two
students of 2+2 and 1+1 blocks on one teacher pass -> 1+1 from the wider one -> a narrower 1+1), killed in stage 2
and rerun: stage 2 resumes, stage 1 is left byte for byte, and the end is the uninterrupted chain's. Reruns
that skip, refuse or redo stages run in one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ds_distill.chain import tree_hash
from tests.conftest import REPO, run_cli, subprocess_env, translation_config, write_yaml
from tests.distributed.launch import deepspeed_command, shared_memory_left

pytestmark = pytest.mark.distributed


def sliced(layers, d_model, d_ff, heads):
    dims = {"encoder_layers": layers, "decoder_layers": layers, "d_model": d_model, "d_ff": d_ff}
    return {"init": {"from_teacher": {**dims, "num_heads": heads, "strategy": "sliced"}}}


def chain_config(tiny, output_dir) -> dict:
    """Stage l2 trains two students on one teacher pass; l1 learns from l2/wide; l1_narrow from l1."""
    defaults = translation_config(tiny, output_dir / "unused", train={"max_steps": 8, "save_steps": 4,
                                                                      "generation_max_length": 12})  # fmt: skip
    del defaults["train"]["output_dir"], defaults["student"]["init"]
    return {
        "output_dir": str(output_dir),
        "defaults": defaults,
        "stages": [
            {"name": "l2", "students": {"wide": {"student": sliced(2, 48, 96, 3)},
                                        "narrow": {"student": sliced(1, 32, 64, 2)}}},
            {"name": "l1", "teacher_from": "l2/wide", "student": sliced(1, 32, 64, 2)},
            {"name": "l1_narrow", "student": sliced(1, 16, 32, 1), "train": {"learning_rate": 2e-3}},
        ],
    }  # fmt: skip


def run_chain(tmp_path, name, config, *flags, ranks: int = 2) -> subprocess.CompletedProcess:
    """The chain on 2 ranks (`deepspeed`), or in one process where the ranks are not the subject (a rerun that
    skips, refuses or redoes stages)."""
    path = write_yaml(tmp_path / f"{name}.yaml", config)
    if ranks == 1:
        result = run_cli("chain", f"--config={path}", *flags, timeout=900)
        (tmp_path / f"{name}.log").write_text(result.stdout + result.stderr)
        return result
    command = deepspeed_command(path, *flags, verb="chain")
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    (tmp_path / f"{name}.log").write_text(result.stdout + result.stderr)
    assert not shared_memory_left(command)
    return result


UNITS = ["l2/wide", "l2/narrow", "l1", "l1_narrow"]


def test_a_chain_killed_in_stage_2_resumes_there_and_ends_as_an_uninterrupted_one(tiny, tmp_path):
    whole = chain_config(tiny, tmp_path / "whole")
    result = run_chain(tmp_path, "whole", whole)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    manifest = json.loads((tmp_path / "whole" / "chain.json").read_text())
    assert sorted(manifest["stages"]) == sorted(UNITS) and list(manifest["stages"])[-1] == "l1_narrow"
    assert manifest["stages"]["l1"]["teacher"] == str(tmp_path / "whole" / "l2" / "wide" / "model")
    widths = {}
    for unit, stage in manifest["stages"].items():
        export = Path(stage["export"])
        assert stage["export"] == str(tmp_path / "whole" / unit / "model")
        assert stage["export_sha256"] == tree_hash(export)
        assert set(stage["evaluation"]) >= {"loss", "bleu", "chrf"}
        assert json.loads((export.parent / "eval" / "report.json").read_text())["metrics"] == stage["evaluation"]
        widths[unit] = json.loads((export / "config.json").read_text())["d_model"]
    assert widths == {"l2/wide": 48, "l2/narrow": 32, "l1": 32, "l1_narrow": 16}

    # run again unchanged: every stage (the one of two students too) is skipped, every file left as it was
    hashes = {unit: tree_hash(tmp_path / "whole" / unit) for unit in UNITS}
    again = run_chain(tmp_path, "again", whole, ranks=1)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert all(f"stage {stage} finished earlier" in again.stdout for stage in ("l2", "l1", "l1_narrow"))
    assert {unit: tree_hash(tmp_path / "whole" / unit) for unit in UNITS} == hashes

    # the same chain, killed (all ranks, kill -9) once stage 2 has written its first checkpoint
    killed = chain_config(tiny, tmp_path / "killed")
    path = write_yaml(tmp_path / "killed.yaml", killed)
    with open(tmp_path / "killed_first.log", "w") as out:
        process = subprocess.Popen(deepspeed_command(path, verb="chain"), cwd=REPO, env=subprocess_env(), stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        deadline = time.time() + 600
        latest = tmp_path / "killed" / "l1" / "checkpoints" / "latest"
        while not latest.exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert latest.exists() and not (tmp_path / "killed" / "l1" / "model").exists()
    stage_1 = tree_hash(tmp_path / "killed" / "l2")
    stage_1_times = {p: p.stat().st_mtime_ns for p in (tmp_path / "killed" / "l2").rglob("*")}

    result = run_chain(tmp_path, "killed_rerun", killed)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "stage l2 finished earlier" in result.stdout
    assert "stage l1 (resuming)" in result.stdout and "stage l1_narrow (starting)" in result.stdout
    assert tree_hash(tmp_path / "killed" / "l2") == stage_1
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "killed" / "l2").rglob("*")} == stage_1_times
    ends = [load_file(tmp_path / run / "l1_narrow" / "model" / "model.safetensors") for run in ("whole", "killed")]
    for name, tensor in ends[0].items():
        torch.testing.assert_close(ends[1][name], tensor, rtol=1e-5, atol=1e-6)

    # a finished stage whose config changed is refused by name, and redone when --overwrite names it
    whole["stages"][1]["train"] = {"learning_rate": 5e-4}
    refused = run_chain(tmp_path, "changed", whole, ranks=1)
    assert refused.returncode == 2
    assert "stage l1 finished with another config" in refused.stderr and "--overwrite=l1" in refused.stderr
    redone = run_chain(tmp_path, "changed_overwrite", whole, "--overwrite=l1,l1_narrow", ranks=1)
    assert redone.returncode == 0, redone.stdout[-4000:] + redone.stderr[-4000:]
    assert "stage l2 finished earlier" in redone.stdout
    manifest = json.loads((tmp_path / "whole" / "chain.json").read_text())
    assert manifest["stages"]["l1"]["config"]["train"]["learning_rate"] == 5e-4

    # an export that later stages were built from and that changed since is refused, naming it
    with open(tmp_path / "whole" / "l2" / "wide" / "model" / "config.json", "a") as edited:
        edited.write("\n")
    refused = run_chain(tmp_path, "export_changed", whole, ranks=1)
    assert (
        refused.returncode == 2
        and "stage l2/wide's export" in refused.stderr
        and "changed since it finished" in refused.stderr
    )
