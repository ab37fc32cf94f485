"""`ds-distill cache_teacher` under DeepSpeed (ZeRO-3 inference teacher): two ranks write the cache one rank
writes, a killed cache run finishes where it stopped, and a 2-rank run from the cache (k = the vocabulary)
trains as the online teacher's run does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from tests.conftest import REPO, run_cli, subprocess_env, write_yaml
from tests.distributed.launch import deepspeed_command, distill, launch, losses

pytestmark = pytest.mark.distributed


def cache_files(directory) -> dict[str, dict[str, torch.Tensor]]:
    return {path.name: load_file(path) for path in sorted(directory.glob("shard_*.safetensors"))}


def assert_same_cache(directory, expected) -> None:
    shards = cache_files(directory)
    assert shards.keys() == expected.keys() and len(shards) == 32
    for name, tensors in expected.items():
        assert tensors.keys() == shards[name].keys()
        for key, tensor in tensors.items():
            assert torch.equal(shards[name][key], tensor), (name, key)


def test_two_ranks_write_the_cache_of_one_a_killed_run_resumes_and_a_cached_run_trains_as_the_online_one(
    tiny, t5_zero2, tmp_path
):
    """The cache of the shared `t5_zero2` run's training split (512 examples), and that run from it."""
    vocabulary = len(AutoTokenizer.from_pretrained(tiny["tokenizer"]))
    config = t5_zero2.config
    path = write_yaml(tmp_path / "run.yaml", config)
    flags = [
        f"--top_k={vocabulary}",
        "--dtype=float32",
        "--shard_examples=16",
        "--batch_size=1",
    ]  # a shard: 16 forwards

    one = run_cli("cache_teacher", f"--config={path}", f"--output_dir={tmp_path / 'one'}", *flags)
    assert one.returncode == 0, one.stderr[-4000:]
    expected = cache_files(tmp_path / "one")

    # two ranks, killed (kill -9 every rank) once the first shards are written; the same command then writes
    # only the rest, and the two ranks' cache is the one rank's
    killed = deepspeed_command(path, f"--output_dir={tmp_path / 'killed'}", *flags, verb="cache_teacher")
    with open(tmp_path / "killed_first.log", "w") as out:
        process = subprocess.Popen(killed, cwd=REPO, env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
        deadline = time.time() + 300
        # each rank writes its own shards, so shard 1 can come first: wait for any two
        while len(list((tmp_path / "killed").glob("shard_*.safetensors"))) < 2 and time.time() < deadline:
            time.sleep(0.01)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "killed").glob("shard_*.safetensors")}
    assert 2 <= len(written) < 32, f"{len(written)} of 32 shards written when the run was killed"
    assert not json.loads((tmp_path / "killed" / "cache.json").read_text())["complete"]
    launch(killed, tmp_path / "killed_rerun.log")
    assert_same_cache(tmp_path / "killed", expected)
    assert {p: p.stat().st_mtime_ns for p in written} == written  # kept, not written again
    assert json.loads((tmp_path / "killed" / "cache.json").read_text())["complete"]

    # a 2-rank run from the cache: no teacher loaded, the online run's losses and weights
    online = t5_zero2.dir
    cached_config = {**config, "teacher": {**config["teacher"], "cache": str(tmp_path / "one")},
                     "train": {**config["train"], "output_dir": str(tmp_path / "cached")}}  # fmt: skip
    cached = distill(tmp_path, "cached", cached_config)
    assert (online / "ds_config_teacher.json").is_file() and not (cached / "ds_config_teacher.json").exists()
    expected_losses, cached_losses = losses(online), losses(cached)
    assert cached_losses.keys() == expected_losses.keys() == set(range(1, 13))
    for step, loss in expected_losses.items():
        assert abs(cached_losses[step] - loss) <= 1e-5 * abs(loss), step
    weights = [load_file(run / "model" / "model.safetensors") for run in (online, cached)]
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, rtol=1e-4, atol=1e-6)
