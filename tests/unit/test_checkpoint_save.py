"""A checkpoint whose writing fails on any rank, for any reason, is never marked complete, and every rank stops
at once with a message that names the checkpoint and what failed, instead of waiting in a collective."""

from __future__ import annotations

import datetime
import multiprocessing
import os
import time
from pathlib import Path

import pytest
import torch

from ds_distill.train import checkpoint
from tests.distributed.launch import free_port


class FakeEngine:
    """Writes a shard like DeepSpeed's `save_checkpoint`, or raises `error` instead."""

    def __init__(self, error: Exception | None = None):
        self.error = error

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        if self.error is not None:
            raise self.error
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(b"weights")


def test_any_exception_while_writing_leaves_the_checkpoint_incomplete(tmp_path):
    error = ValueError("DeepSpeed could not serialise the optimizer state")
    with pytest.raises(RuntimeError, match=r"checkpoint .*step_3 was not written completely \(rank 0: ValueError"):
        checkpoint.save(FakeEngine(error), tmp_path, step=3, client_state={}, keep=2)
    assert not (tmp_path / "step_3" / checkpoint.COMPLETE).exists()
    assert not (tmp_path / "latest").exists()
    assert checkpoint.latest_tag(tmp_path) is None


def test_the_original_exception_stays_in_the_traceback(tmp_path):
    error = OSError(28, "No space left on device")
    with pytest.raises(RuntimeError) as raised:
        checkpoint.save(FakeEngine(error), tmp_path, step=3, client_state={}, keep=2)
    assert raised.value.__cause__ is error


def test_a_successful_save_is_complete_and_latest(tmp_path):
    checkpoint.save(FakeEngine(), tmp_path, step=3, client_state={}, keep=2)
    assert (tmp_path / "step_3" / checkpoint.COMPLETE).is_file()
    assert checkpoint.latest_tag(tmp_path) == "step_3"


def _save_on_two_ranks(rank: int, port: int, root: str, results, done) -> None:
    """One of two gloo ranks: rank 1's engine raises. A rank keeps its process alive until the test has both
    results, as a trainer's rank would while the others are still in the collective."""
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    timeout = datetime.timedelta(seconds=30)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2, timeout=timeout)
    engine = FakeEngine(RuntimeError("shard write failed") if rank == 1 else None)
    start = time.monotonic()
    try:
        checkpoint.save(engine, Path(root), step=5, client_state={}, keep=2)
        results.put((rank, "saved", "", time.monotonic() - start))
    except Exception as error:
        results.put((rank, type(error).__name__, str(error), time.monotonic() - start))
    done.wait(60)


def test_a_rank_that_raises_stops_the_other_rank_at_once(tmp_path):
    context = multiprocessing.get_context("spawn")
    results, done = context.Queue(), context.Event()
    port = free_port()
    ranks = [context.Process(target=_save_on_two_ranks, args=(r, port, str(tmp_path), results, done)) for r in (0, 1)]
    for process in ranks:
        process.start()
    try:
        outcomes = {}
        for _ in ranks:
            rank, kind, message, seconds = results.get(timeout=120)
            outcomes[rank] = (kind, message, seconds)
    finally:
        done.set()
        for process in ranks:
            process.join(30)
            if process.is_alive():
                process.kill()
    for rank in (0, 1):
        kind, message, seconds = outcomes[rank]
        assert kind == "RuntimeError", (rank, kind, message)
        assert "step_5 was not written completely (rank 1: RuntimeError: shard write failed)" in message
        assert seconds < 20, (rank, seconds)  # well inside the 30 s collective timeout
    assert not (tmp_path / "step_5" / checkpoint.COMPLETE).exists()


def test_students_resume_together_from_the_newest_step_all_completed(tmp_path):
    """A kill between two students' saves leaves one a step ahead: both resume from the step they share."""
    from types import SimpleNamespace

    from ds_distill.errors import ConfigError
    from ds_distill.train.loop import resume_tag

    def student(name, steps, resume=True, incomplete=()):
        for step in (*steps, *incomplete):
            (tmp_path / name / "checkpoints" / f"step_{step}").mkdir(parents=True)
        for step in steps:
            (tmp_path / name / "checkpoints" / f"step_{step}" / checkpoint.COMPLETE).write_text("{}")
        return SimpleNamespace(output_dir=tmp_path / name, resumes=resume)

    ahead, behind = student("a", [4, 8, 12]), student("b", [4, 8], incomplete=[12])
    assert resume_tag({"a": ahead, "b": behind}) == "step_8"
    assert resume_tag({"a": SimpleNamespace(resumes=False), "b": SimpleNamespace(resumes=False)}) is None
    with pytest.raises(ConfigError, match="students c have no checkpoint to resume from"):
        resume_tag({"a": ahead, "c": SimpleNamespace(resumes=False)})
    with pytest.raises(ConfigError, match="no checkpoint step in common"):
        resume_tag({"a": ahead, "d": student("d", [16])})
