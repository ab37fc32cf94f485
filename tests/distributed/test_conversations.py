"""Conversations (`data.messages_field`) through the teacher cache, several students on one teacher pass and a
chain: one process, the tiny GPT-2 teacher reading through a chat template given to the tiny tokenizer."""

from __future__ import annotations

import shutil

import pytest
from transformers import AutoTokenizer

from tests.conftest import TINY_CHAT_TEMPLATE, causal_lm_config, conversation_data, run_cli, write_yaml
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


def test_a_chain_on_conversations_reads_them_through_each_teacher_s_chat_template(tiny, tmp_path):
    """No data.tokenizer: the teacher's directory carries the chat template, stage 1's export keeps it, and stage
    2 reads the conversations through it with that export as its teacher."""
    data = conversation_data(tiny, tmp_path, train=16, validation=8)
    teacher = shutil.copytree(tiny["gpt2"], tmp_path / "teacher")
    AutoTokenizer.from_pretrained(data.pop("tokenizer")).save_pretrained(teacher)
    defaults = causal_lm_config(tiny, tmp_path / "unused", data=data, teacher={"model_name_or_path": str(teacher)},
                                losses={"ce": {"weight": 1.0}, "kd": {"weight": 1.0}}, train={"max_steps": 2})  # fmt: skip
    del defaults["train"]["output_dir"]
    narrower = {"init": {"from_teacher": {"decoder_layers": 1, "d_model": 16, "num_heads": 1}}}
    config = {"output_dir": str(tmp_path / "chain"), "defaults": defaults,
              "stages": [{"name": "wide"}, {"name": "narrow", "student": narrower}]}  # fmt: skip
    result = run_cli("chain", f"--config={write_yaml(tmp_path / 'chain.yaml', config)}", timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    for stage in ("wide", "narrow"):
        assert sorted(losses(tmp_path / "chain" / stage)) == [1, 2] and len(kd_losses(tmp_path / "chain" / stage)) == 2
        assert AutoTokenizer.from_pretrained(tmp_path / "chain" / stage / "model").chat_template == TINY_CHAT_TEMPLATE
    stage_2 = (tmp_path / "chain" / "narrow" / "config.yaml").read_text()
    assert str(tmp_path / "chain" / "wide" / "model") in stage_2


def kd_losses(run_dir) -> list[float]:
    return [row["loss/kd"] for row in training_log(run_dir) if "loss/kd" in row]
