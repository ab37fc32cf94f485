"""Reference runs that several tests assert on: each launched once per session, read-only afterwards.

A 2-rank launch costs about 12 s and 20 CPU-seconds of fixed work (launcher, interpreters, imports, engines:
bench/RESULTS.md), its tiny steps milliseconds, so tests compare against these runs instead of launching their
own copy (as DeepSpeed's suite shares one distributed environment between tests). A test that must change a run works on a copy: `cut_back`
makes one as a killed run would have left it. At the end of the session each reference is checked unchanged.

- `t5_zero2`: the tiny T5 teacher under ZeRO-3 inference, a 1+1-block student under ZeRO-2, CE + KD, 12 steps,
  checkpoints every 4, BLEU at the end (tests/conftest.py `translation_config`).
- `t5_zero3`: the same with the student under ZeRO-3.
- `gpt2_zero3`: GPT-2 on packed text, the student under ZeRO-3, CE + reverse KL + CKA.
- `cohort`: one launch of several T5 students on one teacher pass (`students:`, `COHORT`): one equal to
  `t5_zero2`'s, one per layer-wise method, one cut from the teacher by importance, HomoDistil.
- `cka_alone`: the cohort's student `b` as a run of its own.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import causal_lm_config, once, translation_config
from tests.distributed.launch import distill

ZERO3 = "ds_configs/student_zero3.json"
TEACHER_SIZED = dict.fromkeys(("encoder_layers", "decoder_layers", "d_model", "d_ff", "num_heads"))
COHORT = {
    "a": {},  # t5_zero2's student
    "b": {"method": "cka", "student": {"deepspeed_config": ZERO3}, "train": {"learning_rate": 5.0e-4}},
    "miniend_d": {"method": "miniend_d", "student": {"deepspeed_config": ZERO3}},
    "makd": {"method": "makd", "student": {"deepspeed_config": ZERO3}},
    "makd_zero2": {"method": "makd"},
    "linear": {"method": "linear"},
    # cut from the teacher, its channels, heads and FFN neurons ranked on both ranks' calibration batches
    "sliced": {"student": {"deepspeed_config": ZERO3, "init": {"from_teacher": {
        "strategy": "sliced", "width": "importance", "calibration_batches": 2}}}},
    # a copy of the teacher pruned to d_model 48, d_ff 96 and 2 heads over steps 1-10 of 12
    "homodistil": {"method": "homodistil", "student": {"init": {"from_teacher": {**TEACHER_SIZED, "strategy": "sliced"}}},
                   "prune": {"d_model": 48, "d_ff": 96, "num_heads": 2, "steps": 10}},
}  # fmt: skip
"""The cohort's students: each overrides the shared config (tests/conftest.py translation_config); the
layer-wise methods read teacher features that `a` does not, so the one teacher pass captures their union."""


@dataclass(frozen=True)
class Run:
    """A finished run: its output_dir, the config it ran with, and the launch's output."""

    dir: Path
    config: dict
    log: Path


def t5_config(tiny, output_dir: Path, **sections) -> dict:
    """`t5_zero2`'s config (other output_dir, sections merged in)."""
    train = {"eval_metric": "bleu", "generation_max_length": 16, **sections.pop("train", {})}
    return translation_config(tiny, output_dir, train=train, **sections)


def gpt2_config(tiny, output_dir: Path) -> dict:
    """`gpt2_zero3`'s config."""
    losses = {"ce": {"weight": 1.0}, "kd": {"weight": 1.0, "divergence": "reverse_kl"}, "cka": {"weight": 1.0}}
    return causal_lm_config(tiny, output_dir, losses=losses)


def cohort_alone_config(tiny, output_dir: Path, name: str) -> dict:
    """Student `name` of the cohort as a run of its own."""
    from ds_distill.config.load import merge

    return merge(translation_config(tiny, output_dir), COHORT[name])


def _launched(tmp_path_factory, name: str, build_config) -> Run:
    """The run `build_config(output_dir)` configures, launched once in the session (conftest.once)."""

    def launch(root: Path) -> dict:
        root.mkdir(parents=True)
        config = build_config(root / "run")
        return {"dir": str(distill(root, name, config)), "config": config, "log": str(root / f"{name}.log")}

    run = once(tmp_path_factory, name, launch)
    return Run(Path(run["dir"]), run["config"], Path(run["log"]))


@pytest.fixture(scope="session")
def unchanged():
    """Registers a reference run's files; at the end of the session each must be as it was when it finished."""
    from ds_distill.chain import tree_hash

    runs = {}

    def register(run: Run) -> Run:
        runs[run.dir] = tree_hash(run.dir)
        return run

    yield register
    changed = [str(path) for path, digest in runs.items() if tree_hash(path) != digest]
    assert not changed, f"tests wrote into shared reference runs (work on a copy: references.cut_back): {changed}"


@pytest.fixture(scope="session")
def t5_zero2(tiny, tmp_path_factory, unchanged) -> Run:
    drafts = {"eval_draft_for": str(tiny["t5"])}  # the student measured as the teacher's draft at each evaluation
    return unchanged(_launched(tmp_path_factory, "t5_zero2", lambda out: t5_config(tiny, out, train=drafts)))


@pytest.fixture(scope="session")
def t5_zero3(tiny, tmp_path_factory, unchanged) -> Run:
    zero3 = {"deepspeed_config": ZERO3}
    return unchanged(_launched(tmp_path_factory, "t5_zero3", lambda out: t5_config(tiny, out, student=zero3)))


@pytest.fixture(scope="session")
def gpt2_zero3(tiny, tmp_path_factory, unchanged) -> Run:
    return unchanged(_launched(tmp_path_factory, "gpt2_zero3", lambda out: gpt2_config(tiny, out)))


@pytest.fixture(scope="session")
def cohort(tiny, tmp_path_factory, unchanged) -> Run:
    return unchanged(
        _launched(tmp_path_factory, "cohort", lambda out: {**translation_config(tiny, out), "students": COHORT})
    )


@pytest.fixture(scope="session")
def cka_alone(tiny, tmp_path_factory, unchanged) -> Run:
    return unchanged(_launched(tmp_path_factory, "cka_alone", lambda out: cohort_alone_config(tiny, out, "b")))


def cut_back(run: Run, copy: Path, steps: dict[str, int] | int) -> dict:
    """A copy of a finished run as a run killed after its checkpoint at `steps` would have left it (its later
    checkpoints, log rows and export gone); returns the config that resumes it in `copy`. For a run of several
    students, `steps` may give each its own step (a kill between two students' saves)."""
    shutil.copytree(run.dir, copy)
    students = sorted(run.config.get("students", {})) or [""]
    for student in students:
        step = steps if isinstance(steps, int) else steps[student]
        run_dir = copy / student
        checkpoints = run_dir / "checkpoints"
        for tag in checkpoints.glob("step_*"):
            if int(tag.name.split("_")[1]) > step:
                shutil.rmtree(tag)
        assert (checkpoints / f"step_{step}" / "COMPLETE").is_file(), f"{run.dir / student} kept no step {step}"
        (checkpoints / "latest").write_text(f"step_{step}")
        shutil.rmtree(run_dir / "model")
        rows = [line for line in (run_dir / "log.jsonl").read_text().splitlines() if json.loads(line)["step"] <= step]
        (run_dir / "log.jsonl").write_text("".join(row + "\n" for row in rows))
    return {**json.loads(json.dumps(run.config)), "train": {**run.config["train"], "output_dir": str(copy)}}
