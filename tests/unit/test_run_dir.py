"""Nothing of the user's is deleted: only directories marked as ours are replaced, never protected ones."""

import io
import json
import random

import numpy as np
import pytest
import torch

from ds_distill.config import run_dir
from ds_distill.errors import ConfigError
from ds_distill.train.checkpoint import rng_state, set_rng_state

CONFIG = "train:\n  learning_rate: 0.001\n  max_steps: 10\n"


def claim(path, resume=False, overwrite=False, has_checkpoint=False, config=CONFIG):
    return run_dir.claim(path, config, resume, overwrite, has_checkpoint)


def test_overwrite_replaces_only_a_marked_run(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.yaml").write_text("a config.yaml alone does not make a run")
    with pytest.raises(ConfigError, match="is not a ds_distill run .*ds_distill_run.json"):
        claim(foreign, overwrite=True)
    assert (foreign / "config.yaml").is_file()

    run = tmp_path / "run"
    claim(run)
    (run / "log.jsonl").write_text("{}")
    claim(run, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == [run_dir.RUN_MARKER]


def test_resume_auto_continues_the_same_run_when_it_has_a_checkpoint_and_starts_it_otherwise(tmp_path):
    from ds_distill.cli.args import resume_flag

    run = tmp_path / "run"
    assert claim(run, resume="auto") is False  # nothing there yet
    (run / "config.yaml").write_text(CONFIG)
    assert claim(run, resume="auto") is False  # killed before its first checkpoint: starts again
    assert claim(run, resume="auto", has_checkpoint=True) is True
    with pytest.raises(ConfigError, match="already holds this run's checkpoints; pass --resume"):
        claim(run, has_checkpoint=True)  # without it, a rerun is refused as before
    longer = CONFIG.replace("10", "20")
    with pytest.raises(ConfigError, match=r"a different config \(train.max_steps 10 -> 20\), which --resume=auto"):
        claim(run, resume="auto", has_checkpoint=True, config=longer)
    assert claim(run, resume=True, has_checkpoint=True, config=longer) is True  # --resume may run longer
    faster = CONFIG.replace("0.001", "0.002")
    with pytest.raises(ConfigError, match=r"differ from its config.yaml: train.learning_rate 0.001 -> 0.002; only"):
        claim(run, resume=True, has_checkpoint=True, config=faster)  # but not change how it trains
    assert resume_flag("auto") == "auto" and resume_flag(True) is True
    with pytest.raises(ConfigError, match="--resume takes no value, or =auto"):
        resume_flag("yes")


def test_a_new_run_refuses_a_directory_of_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds files that are not a ds_distill run"):
        claim(tmp_path / ".")


def test_the_working_and_home_directories_and_their_parents_are_never_replaced(tmp_path, monkeypatch):
    run = tmp_path / "home" / "run"
    claim(run)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for target in (tmp_path / "home", tmp_path):
        with pytest.raises(ConfigError, match="cannot be replaced: it (is|holds) your home directory"):
            claim(target, overwrite=True)
    monkeypatch.chdir(run)
    with pytest.raises(ConfigError, match="cannot be replaced: it is the working directory"):
        claim(run, overwrite=True)
    assert (run / run_dir.RUN_MARKER).is_file()


def test_an_export_replaces_only_an_earlier_export_unless_told(tmp_path):
    claim(tmp_path / "run")
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir()
    earlier = tmp_path / "exported"
    earlier.mkdir()
    (earlier / run_dir.EXPORT_MARKER).write_text("{}")
    run_dir.check_export_target(earlier, overwrite=False, source=checkpoints)
    run_dir.check_export_target(tmp_path / "new", overwrite=False, source=checkpoints)

    other = tmp_path / "other"
    other.mkdir()
    (other / "data.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not empty and is not an earlier export"):
        run_dir.check_export_target(other, overwrite=False, source=checkpoints)
    run_dir.check_export_target(other, overwrite=True, source=checkpoints)

    claim(tmp_path / "another_run")
    with pytest.raises(ConfigError, match="holds a ds_distill run, which --overwrite never replaces"):
        run_dir.check_export_target(tmp_path / "another_run", overwrite=True, source=checkpoints)
    with pytest.raises(ConfigError, match="holds the checkpoints being exported"):
        run_dir.check_export_target(checkpoints, overwrite=True, source=checkpoints)


def test_rng_state_round_trips_through_a_weights_only_load():
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    np.random.randn()  # leaves a cached Gaussian in numpy's state
    buffer = io.BytesIO()
    torch.save(rng_state(), buffer)
    expected = (random.random(), np.random.randn(), torch.rand(3).tolist())
    buffer.seek(0)
    set_rng_state(torch.load(buffer, weights_only=True))
    assert (random.random(), np.random.randn(), torch.rand(3).tolist()) == expected


def test_checkpoints_are_pruned_to_the_newest_complete_ones_and_crash_leftovers_go(tmp_path):
    from ds_distill.train.checkpoint import COMPLETE, _prune, _readable, latest_tag

    for step, complete in ((100, True), (200, True), (250, False), (300, True), (400, False)):
        (tmp_path / f"step_{step}").mkdir()
        if complete:
            (tmp_path / f"step_{step}" / COMPLETE).write_text(json.dumps({"step": step, "world_size": 2}))
    _prune(tmp_path, keep=2, newest=300)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_200", "step_300", "step_400"]  # 400: a later save
    assert latest_tag(tmp_path) == "step_300"
    assert "was saved by 2 ranks; resume it with 2, not 1" in _readable(tmp_path, "step_300")
    assert "cannot see" in _readable(tmp_path, "step_400")
