"""Mistakes a new user makes, each refused in one line that names the thing (exit 2, no traceback) before
anything is written: data files, YAML, model directories, student dimensions, checkpoints, output directories.

Refusals that come before a process group starts run in this process (`run_verb`); those a run reaches after
it has started one (a model directory's weights, the student's size, the output directory) in a fresh one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_cli, run_verb, translation_config, write_yaml

TRAIN_ROWS = 20


def data_files(tmp_path: Path, tiny) -> dict:
    """Copies of the first rows of the shared sample, to spoil one at a time."""
    source = translation_config(tiny, "-")["data"]["data_files"]
    files = {}
    for split in ("train", "validation"):
        lines = open(source[split]).readlines()[:TRAIN_ROWS]
        files[split] = tmp_path / f"{split}.jsonl"
        files[split].write_text("".join(lines))
    return files


def spoil(case: str, tmp_path: Path, tiny) -> tuple[str, list[str]]:
    """Writes what `case` needs under tmp_path/inputs; returns (how to run it, its arguments)."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    files = data_files(inputs, tiny)
    config = translation_config(tiny, tmp_path / "run", data={"max_train_samples": 16})
    config["data"]["data_files"] = {split: str(path) for split, path in files.items()}
    tokenized = f"--data.tokenized_path={tmp_path / 'tokenized'}"
    rows = [json.loads(line) for line in files["train"].read_text().splitlines()]
    if case == "an empty training file":
        files["train"].write_text("")
    elif case == "a row without the target language":
        del rows[7]["translation"]["de"]
        files["train"].write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif case == "training and validation files of other layouts":
        files["validation"].write_text("".join(json.dumps({"src": r["translation"]["en"]}) + "\n" for r in rows))
    elif case == "a malformed JSON line":
        lines = files["train"].read_text().splitlines()
        files["train"].write_text("\n".join([*lines[:5], lines[5][:40], *lines[6:]]) + "\n")
    if case in ("an empty training file", "a row without the target language",
                "training and validation files of other layouts", "a malformed JSON line"):  # fmt: skip
        return "in process", ["prepare_data", f"--config={write_yaml(inputs / 'run.yaml', config)}", tokenized]
    if case == "a YAML syntax error":
        (inputs / "run.yaml").write_text("train:\n  max_steps: [1\n")
        return "in process", ["distill", f"--config={inputs / 'run.yaml'}"]
    if case == "an empty YAML":
        (inputs / "run.yaml").write_text("")
        return "in process", ["distill", f"--config={inputs / 'run.yaml'}"]
    if case == "a base that is not there":
        (inputs / "run.yaml").write_text("base: other.yaml\n")
        return "in process", ["distill", f"--config={inputs / 'run.yaml'}"]
    if case.startswith("make_student"):
        flag = case.split()[1]
        return "in process", ["make_student", f"--teacher={tiny['t5']}", f"--output_dir={tmp_path / 'run'}", flag]
    if case == "export of a checkpoint that is not there":
        return "export", []
    teacher = inputs / "teacher"
    shutil.copytree(tiny["t5"], teacher)
    config["teacher"]["model_name_or_path"] = str(teacher)
    config["data"]["tokenizer"] = str(tiny["tokenizer"])
    if case == "a teacher without weights":
        (teacher / "model.safetensors").unlink()
    elif case == "a truncated teacher":
        weights = (teacher / "model.safetensors").read_bytes()
        (teacher / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    elif case == "a student wider than its teacher":
        config["student"]["init"]["from_teacher"]["d_model"] = 256
    elif case == "the home directory as output_dir":
        config["train"]["output_dir"] = "~"
        return "fresh process", ["distill", f"--config={write_yaml(inputs / 'run.yaml', config)}", "--overwrite"]
    return "fresh process", ["distill", f"--config={write_yaml(inputs / 'run.yaml', config)}"]


CASES = {
    "an empty training file": "data.data_files.train: file {inputs}/train.jsonl is empty",
    "a row without the target language": "split 'train' has a row without 'de' text",
    "training and validation files of other layouts": "data.data_files hold rows of different fields",
    "a malformed JSON line": "{inputs}/train.jsonl, line 6: not a JSON object",
    "a YAML syntax error": "{inputs}/run.yaml, line 3, column 1: not valid YAML",
    "an empty YAML": "{inputs}/run.yaml is empty",
    "a base that is not there": "base other.yaml: no file {inputs}/other.yaml",
    "a teacher without weights": "teacher.model_name_or_path {inputs}/teacher holds no weights",
    "a truncated teacher": "teacher weights {inputs}/teacher/model.safetensors cannot be read, truncated",
    "a student wider than its teacher": "larger than its teacher",
    "the home directory as output_dir": "cannot be replaced: it is your home directory",
    "make_student --d_model=0": "student.init.from_teacher.d_model must be at least 1, got 0",
    "make_student --d_ff=0": "student.init.from_teacher.d_ff must be at least 1, got 0",
    "make_student --num_heads=0": "student.init.from_teacher.num_heads must be at least 1, got 0",
    "make_student --d_model=-8": "student.init.from_teacher.d_model must be at least 1, got -8",
    "make_student --encoder_layers=0": "student.init.from_teacher.encoder_layers must be at least 1, got 0",
    "make_student --d_model=128": "student.init.from_teacher.d_model 128 is more than the teacher's 64",
    "make_student --target_params=100B": "--target_params 100B is not below the teacher's 0.3M parameters",
    "export of a checkpoint that is not there": "--tag step_99: no complete checkpoint of that name",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_input_is_refused_in_one_line_naming_it_and_nothing_is_written(case, tiny, tmp_path, request):
    how, args = spoil(case, tmp_path, tiny)
    if how == "export":
        checkpoints = request.getfixturevalue("t5_zero2").dir / "checkpoints"
        args = ["export", f"--checkpoint_dir={checkpoints}", f"--output_dir={tmp_path / 'run'}", "--tag=step_99"]
    result = (run_verb if how == "in process" else run_cli)(*args)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and CASES[case].format(inputs=tmp_path / "inputs") in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "[rank0]" not in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["inputs"]  # nothing written beside them
