"""Conversations (`data.messages_field`) through the teacher cache and several students on one teacher pass: one
rank, the tiny GPT-2 teacher reading through a chat template given to the tiny tokenizer."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from tests.conftest import causal_lm_config, conversation_data, run_cli, write_yaml
from tests.distributed.launch import losses, training_log

pytestmark = pytest.mark.distributed

STUDENTS = {"a": {}, "b": {"train": {"learning_rate": 5.0e-4}}}


def test_two_students_on_a_cache_of_conversations_train_as_on_the_online_teacher(tiny, tmp_path):
    """The cache of the conversations' assistant turns (k = the vocabulary, float32), and two students trained
    from it in one run: each has the losses it has on the online teacher."""
    data = conversation_data(tiny, tmp_path, train=32, validation=8)
    kd = {"ce": {"weight": 1.0}, "kd": {"weight": 1.0}}
    config = causal_lm_config(tiny, tmp_path / "online", data=data, losses=kd, train={"max_steps": 4})
    config = {**config, "students": STUDENTS}
    path = write_yaml(tmp_path / "online.yaml", config)
    vocabulary = len(AutoTokenizer.from_pretrained(data["tokenizer"]))
    cached = run_cli("cache_teacher", f"--config={path}", f"--output_dir={tmp_path / 'cache'}",
                     f"--top_k={vocabulary}", "--dtype=float32")  # fmt: skip
    assert cached.returncode == 0, cached.stderr[-4000:]

    online = run_cli("distill", f"--config={path}")
    assert online.returncode == 0, online.stderr[-4000:]
    from_cache = {**config, "teacher": {**config["teacher"], "cache": str(tmp_path / "cache")},
                  "train": {**config["train"], "output_dir": str(tmp_path / "cached")}}  # fmt: skip
    result = run_cli("distill", f"--config={write_yaml(tmp_path / 'cached.yaml', from_cache)}")
    assert result.returncode == 0, result.stderr[-4000:]
    for name in STUDENTS:
        expected = losses(tmp_path / "online" / name)
        assert sorted(expected) == [1, 2, 3, 4]
        assert losses(tmp_path / "cached" / name) == pytest.approx(expected, rel=1e-5), name
        # the KD term alone (CE is 360 times larger here): the cached distributions sit on the assistant turns
        assert kd_losses(tmp_path / "cached" / name) == pytest.approx(kd_losses(tmp_path / "online" / name), rel=1e-5)
        assert not (tmp_path / "cached" / name / "ds_config_teacher.json").exists()  # no teacher loaded
    assert losses(tmp_path / "online" / "a")[4] != pytest.approx(losses(tmp_path / "online" / "b")[4], rel=1e-4)


def kd_losses(run_dir) -> list[float]:
    return [row["loss/kd"] for row in training_log(run_dir) if "loss/kd" in row]
