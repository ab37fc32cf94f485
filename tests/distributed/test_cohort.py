"""Several students on one teacher pass (`students:`): each trains as it would alone, and they resume together.

The session's shared cohort run (tests/references.py), two CPU ranks: student `a` under ZeRO-2 with CE + KD,
student `b` under ZeRO-3 with the CKA preset (its layer terms read teacher features `a` does not) and another
learning rate, and beside them the layer-wise methods, a student cut from the teacher and HomoDistil; the T5
students keep the teacher's dropout, so each must keep its own random-number state. `a` alone is the shared
`t5_zero2` run, `b` alone `cka_alone`.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.launch import distill, losses
from tests.references import COHORT, cut_back

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("name", ["a", "b"])
def test_each_student_ends_as_it_would_trained_alone(cohort, t5_zero2, cka_alone, name):
    together, alone = cohort.dir / name, {"a": t5_zero2, "b": cka_alone}[name].dir
    assert sorted(losses(together)) == list(range(1, 13))
    assert losses(together) == pytest.approx(losses(alone), rel=1e-5)
    trained, reference = (
        load_file(together / "model" / "model.safetensors"),
        load_file(alone / "model" / "model.safetensors"),
    )
    assert trained.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(trained[key], reference[key], rtol=1e-5, atol=1e-6, msg=key)


def test_the_students_differ_and_write_their_own_runs(cohort):
    a, b = losses(cohort.dir / "a"), losses(cohort.dir / "b")
    assert a[12] != pytest.approx(b[12], rel=1e-3)  # CKA and another learning rate: another run
    for name in COHORT:
        assert (cohort.dir / name / "config.yaml").is_file() and (cohort.dir / name / "tensorboard").is_dir()
    assert "loss/cka" in json.dumps([json.loads(line) for line in open(cohort.dir / "b" / "log.jsonl")])


def checkpoint_state(run_dir) -> dict[str, torch.Tensor]:
    """The fp32 weights of the whole student module (student and loss projections) in the newest checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"))


def test_a_cohort_killed_between_two_students_saves_resumes_to_the_uninterrupted_result(cohort, tmp_path):
    """As a kill while the students saved step 12 leaves it: `a` has its checkpoint at 12, the others theirs at 8.
    They resume together from 8 and end as the uninterrupted run: the `linear` student's projections and
    optimizer state included, and HomoDistil's masks, resumed while it was still pruning."""
    assert COHORT["homodistil"]["prune"]["steps"] > 8
    config = cut_back(cohort, tmp_path / "resumed", {name: 12 if name == "a" else 8 for name in COHORT})
    distill(tmp_path, "resumed", config, "--resume")
    log = (tmp_path / "resumed.log").read_text()
    assert log.count("at step 8") == len(COHORT) and "step_12 at step" not in log
    for name in COHORT:
        resumed_dir, whole = tmp_path / "resumed" / name, cohort.dir / name
        assert losses(resumed_dir) == pytest.approx(losses(whole), rel=1e-6), name
        resumed = load_file(resumed_dir / "model" / "model.safetensors")
        for key, tensor in load_file(whole / "model" / "model.safetensors").items():
            torch.testing.assert_close(resumed[key], tensor, rtol=1e-6, atol=1e-7, msg=f"{name}: {key}")

    resumed, reference = checkpoint_state(tmp_path / "resumed" / "linear"), checkpoint_state(cohort.dir / "linear")
    projection = [name for name in reference if name.startswith("losses.linear.")]
    assert projection, sorted(reference)[:5]
    for name in projection:
        torch.testing.assert_close(resumed[name], reference[name], rtol=1e-6, atol=1e-7)
    exported = load_file(cohort.dir / "linear" / "model" / "model.safetensors")
    assert not any("linear" in name or name.startswith("losses.") for name in exported)  # not part of the student
