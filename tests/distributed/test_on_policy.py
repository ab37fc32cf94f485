"""On-policy KD and sequence-level KD's targets on real runs: a 2-rank on-policy run with the student under ZeRO-3,
killed and resumed, ends as an uninterrupted one, and as one of two students on one teacher pass; `fraction: 0`
is the run without on-policy KD, exactly; `generate_targets` writes on 2 ranks what it writes on 1, and a run
trains on its file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import causal_lm_config, conversation_data, run_cli, translation_config, write_yaml
from tests.distributed.launch import (
    deepspeed_command,
    distill,
    distill_until_first_checkpoint,
    launch,
    losses,
    training_log,
)

pytestmark = pytest.mark.distributed

ON_POLICY = {"fraction": 0.5, "temperature": 1.0, "max_new_tokens": 12}


def on_policy_config(tiny, output_dir):
    kd = {"weight": 1.0, "divergence": "jsd", "beta": 0.5, "on_policy": ON_POLICY}
    return translation_config(
        tiny, output_dir, student={"deepspeed_config": "ds_configs/student_zero3.json"},
        losses={"ce": {"weight": 1.0}, "kd": kd}, train={"max_steps": 6, "save_steps": 2},
    )  # fmt: skip


@pytest.fixture(scope="module")
def whole(tiny, tmp_path_factory) -> Path:
    """The uninterrupted on-policy run."""
    tmp_path = tmp_path_factory.mktemp("on_policy")
    return distill(tmp_path, "whole", on_policy_config(tiny, tmp_path / "whole"))


def sampled_steps(run: Path) -> list[int]:
    """The steps logged with micro-batches on the student's own samples."""
    return [row["step"] for row in training_log(run) if "loss/on_policy_kd" in row]


def assert_same_end(run: Path, reference: Path, rel: float) -> None:
    assert losses(run) == pytest.approx(losses(reference), rel=rel)
    ends = [load_file(path / "model" / "model.safetensors") for path in (reference, run)]
    for name, tensor in ends[0].items():
        torch.testing.assert_close(ends[1][name], tensor, rtol=rel, atol=rel / 10, msg=name)


def test_an_on_policy_zero3_run_killed_and_resumed_ends_as_an_uninterrupted_one(tiny, tmp_path, whole):
    assert 0 < len(sampled_steps(whole)) < 6  # some micro-batches on the student's samples, not all

    config = on_policy_config(tiny, tmp_path / "killed")
    distill_until_first_checkpoint(tmp_path, "killed", config)
    distill(tmp_path, "resumed", config, "--resume")
    assert_same_end(tmp_path / "killed", whole, rel=1e-6)


def test_each_of_two_on_policy_students_on_one_teacher_pass_trains_as_it_would_alone(tiny, tmp_path, whole):
    """Student `a` is the uninterrupted run's config and ends as that run did; `b` learns at another rate."""
    config = {
        **on_policy_config(tiny, tmp_path / "students"),
        "students": {"a": {}, "b": {"train": {"learning_rate": 3e-3}}},
    }
    runs = distill(tmp_path, "students", config)
    assert_same_end(runs / "a", whole, rel=1e-5)
    assert sampled_steps(runs / "b") == sampled_steps(whole)  # the same seed draws the same micro-batches
    assert losses(runs / "b")[6] != pytest.approx(losses(runs / "a")[6], rel=1e-3)


def test_fraction_zero_is_the_run_without_on_policy_kd(tiny, tmp_path):
    """A decoder-only student under ZeRO-3, one rank: the same losses and weights, bit for bit."""
    runs = {}
    for name, kd in (("plain", {"weight": 1.0}), ("zero", {"weight": 1.0, "on_policy": {**ON_POLICY, "fraction": 0}})):
        config = causal_lm_config(tiny, tmp_path / name, losses={"ce": {"weight": 1.0}, "kd": kd})
        result = run_cli("distill", f"--config={write_yaml(tmp_path / f'{name}.yaml', config)}")
        assert result.returncode == 0, result.stderr[-4000:]
        runs[name] = tmp_path / name
    assert losses(runs["zero"]) == losses(runs["plain"])
    plain, zero = (load_file(runs[name] / "model" / "model.safetensors") for name in ("plain", "zero"))
    assert all(torch.equal(zero[name], tensor) for name, tensor in plain.items())


def test_generate_targets_on_two_ranks_writes_what_one_writes_and_a_run_trains_on_it(tiny, tmp_path):
    config = translation_config(tiny, tmp_path / "run", data={"max_train_samples": 24}, train={"max_steps": 2})
    path = write_yaml(tmp_path / "run.yaml", config)
    flags = ["--num_beams=2", "--max_new_tokens=10", "--batch_size=4", "--shard_examples=5"]
    one = run_cli("generate_targets", f"--config={path}", f"--output_dir={tmp_path / 'one'}", *flags)
    assert one.returncode == 0, one.stderr[-4000:]
    launch(deepspeed_command(path, f"--output_dir={tmp_path / 'two'}", *flags, verb="generate_targets"),
           tmp_path / "two.log")  # fmt: skip
    written = (tmp_path / "one" / "train.jsonl").read_text()
    assert (tmp_path / "two" / "train.jsonl").read_text() == written
    rows = [json.loads(line) for line in written.splitlines()]
    sources = [json.loads(line) for line in open(config["data"]["data_files"]["train"])][:24]
    assert [{k: v for k, v in row.items() if k != "teacher_target"} for row in rows] == sources  # the data's order
    assert all(isinstance(row["teacher_target"], str) for row in rows)
    manifest = json.loads((tmp_path / "one" / "targets.json").read_text())
    assert manifest["complete"] and manifest["num_beams"] == 2 and manifest["train_examples"] == 24

    both = {**config["data"], "data_files": {"train": str(tmp_path / "one" / "train.jsonl"),
                                             "validation": str(tmp_path / "one" / "validation.jsonl")},
            "targets": "both"}  # fmt: skip
    trained = write_yaml(tmp_path / "both.yaml", {**config, "data": both})
    result = run_cli("distill", f"--config={trained}")
    assert result.returncode == 0, result.stderr[-4000:]
    assert sorted(losses(tmp_path / "run")) == [1, 2]


@pytest.mark.parametrize("examples", ["prompts", "conversations"])
def test_a_decoder_continues_prompts_for_generate_targets_and_on_policy_kd(tiny, tmp_path, examples):
    """causal_lm with data.prompt_field or data.messages_field (a chat template given to the tiny tokenizer), one
    rank, the student under ZeRO-3: the teacher's continuations (replies) as targets, then a run on them with
    half its micro-batches on the student's own continuations."""
    if examples == "prompts":
        files = {}
        lines = open(config_files(tiny)["train"]).readlines()
        for split, rows in (("train", lines[:24]), ("validation", lines[24:32])):
            files[split] = str(tmp_path / f"{split}.jsonl")
            with open(files[split], "w") as out:
                for line in rows:
                    pair = json.loads(line)["translation"]
                    out.write(json.dumps({"prompt": pair["en"][:80], "text": pair["de"][:80]}) + "\n")
        data, key = {"dataset": "json", "block_size": 96, "prompt_field": "prompt"}, "prompt"
    else:
        data, key = conversation_data(tiny, tmp_path, train=24, validation=8), "messages"
        files = data.pop("data_files")
    config = causal_lm_config(tiny, tmp_path / "run", data={**data, "data_files": files}, train={"max_steps": 3})
    path = write_yaml(tmp_path / "prompted.yaml", config)
    generated = run_cli("generate_targets", f"--config={path}", f"--output_dir={tmp_path / 'targets'}",
                        "--num_beams=2", "--max_new_tokens=8")  # fmt: skip
    assert generated.returncode == 0, generated.stderr[-4000:]
    rows = [json.loads(line) for line in open(tmp_path / "targets" / "train.jsonl")]
    assert [row[key] for row in rows] == [json.loads(line)[key] for line in open(files["train"])]
    assert all(isinstance(row["teacher_target"], str) for row in rows)

    kd = {"weight": 1.0, "divergence": "skew_kl", "on_policy": {"fraction": 0.5, "max_new_tokens": 8}}
    trained = {**config, "losses": {"ce": {"weight": 1.0}, "kd": kd}}
    trained["data"] = {**config["data"], "data_files": {**files, "train": str(tmp_path / "targets" / "train.jsonl")},
                       "targets": "teacher"}  # fmt: skip
    result = run_cli("distill", f"--config={write_yaml(tmp_path / 'trained.yaml', trained)}")
    assert result.returncode == 0, result.stderr[-4000:]
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert sorted(row["step"] for row in log if "loss" in row) == [1, 2, 3]
    assert any("loss/on_policy_kd" in row for row in log)


def config_files(tiny) -> dict:
    return translation_config(tiny, "-")["data"]["data_files"]
