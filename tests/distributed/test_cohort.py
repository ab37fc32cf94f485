"""Several students on one teacher pass (`students:`): each trains as it would alone, and they resume together.

Two CPU ranks; student `a` under ZeRO-2 with CE + KD, student `b` under ZeRO-3 with the CKA preset (its layer
terms read teacher features `a` does not) and another learning rate; the T5 students keep the teacher's dropout,
so each must keep its own random-number state.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import translation_config
from tests.distributed.launch import distill, distill_until_first_checkpoint, losses

pytestmark = pytest.mark.distributed

STUDENTS = {
    "a": {},
    "b": {
        "method": "cka",
        "student": {"deepspeed_config": "ds_configs/student_zero3.json"},
        "train": {"learning_rate": 5.0e-4},
    },
}


def cohort_config(tiny, output_dir):
    config = translation_config(tiny, output_dir, train={"max_steps": 8, "save_steps": 4})
    return {**config, "students": STUDENTS}


def alone_config(tiny, output_dir, name):
    """Student `name` of the cohort as a run of its own."""
    from ds_distill.config.load import merge

    return merge(translation_config(tiny, output_dir, train={"max_steps": 8, "save_steps": 4}), STUDENTS[name])


@pytest.fixture(scope="module")
def cohort(tiny, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cohort")
    config = cohort_config(tiny, tmp / "together")
    return distill(tmp, "together", config), config


@pytest.mark.parametrize("name", ["a", "b"])
def test_each_student_ends_as_it_would_trained_alone(cohort, tiny, tmp_path, name):
    together, _ = cohort
    alone = distill(tmp_path, name, alone_config(tiny, tmp_path / name, name))
    assert sorted(losses(together / name)) == list(range(1, 9))
    assert losses(together / name) == pytest.approx(losses(alone), rel=1e-5)
    trained, reference = (
        load_file(together / name / "model" / "model.safetensors"),
        load_file(alone / "model" / "model.safetensors"),
    )
    assert trained.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(trained[key], reference[key], rtol=1e-5, atol=1e-6, msg=key)


def test_the_students_differ_and_write_their_own_runs(cohort):
    together, _ = cohort
    a, b = losses(together / "a"), losses(together / "b")
    assert a[8] != pytest.approx(b[8], rel=1e-3)  # CKA and another learning rate: another run
    for name in ("a", "b"):
        assert (together / name / "config.yaml").is_file() and (together / name / "tensorboard").is_dir()
    assert "loss/cka" in json.dumps([json.loads(line) for line in open(together / "b" / "log.jsonl")])


def test_a_killed_cohort_resumes_to_the_uninterrupted_result(cohort, tmp_path):
    reference_dir, reference_config = cohort
    config = json.loads(json.dumps(reference_config))
    config["train"]["output_dir"] = str(tmp_path / "interrupted")
    distill_until_first_checkpoint(tmp_path, "interrupted", config, student="b")
    distill(tmp_path, "resumed", config, "--resume")
    for name in ("a", "b"):
        assert losses(tmp_path / "interrupted" / name) == pytest.approx(losses(reference_dir / name), rel=1e-6)
        resumed = load_file(tmp_path / "interrupted" / name / "model" / "model.safetensors")
        reference = load_file(reference_dir / name / "model" / "model.safetensors")
        for key in reference:
            torch.testing.assert_close(resumed[key], reference[key], rtol=1e-6, atol=1e-7, msg=key)
