"""The README's first command: `ds-distill demo` runs end to end and the student cut from the teacher wins."""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, subprocess_env

pytestmark = pytest.mark.distributed


def test_demo_distils_a_student_cut_from_the_teacher_that_beats_both_other_students(tmp_path):
    # one process with every core, as a user runs it; one thread where pytest-xdist's other workers use the rest
    env = {k: v for k, v in subprocess_env().items() if k != "OMP_NUM_THREADS" or os.environ.get("PYTEST_XDIST_WORKER")}
    result = subprocess.run([sys.executable, "-m", "ds_distill", "demo", f"--output_dir={tmp_path}"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    rows = {}
    for line in (tmp_path / "results.md").read_text().splitlines()[2:]:
        name, params, loss, bleu, speed = [cell.strip() for cell in line.strip("|").split("|")]
        rows[name] = {"params": float(params.rstrip("M")), "loss": float(loss), "bleu": float(bleu)}
    teacher = rows["teacher"]
    sliced = rows["distilled student, from the teacher's weights"]
    random_init = rows["distilled student, random init"]
    alone = rows["no-teacher student, random init"]
    assert teacher["params"] >= 3.9 * sliced["params"]  # half the width: 3.96x (embeddings halve only)
    assert sliced["params"] == random_init["params"] == alone["params"]
    # the goal: the student keeps at least 60% of the teacher's BLEU and clearly beats both others
    assert sliced["bleu"] >= 0.6 * teacher["bleu"], rows
    assert sliced["bleu"] > 1.5 * max(random_init["bleu"], alone["bleu"]), rows
    assert sliced["loss"] < random_init["loss"] < alone["loss"], rows
    assert "of the teacher's BLEU" in result.stdout

    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model_dir = tmp_path / "distilled" / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    output = model.generate(**tokenizer(["The big dog chased a cat."], return_tensors="pt"), max_new_tokens=20)
    assert tokenizer.decode(output[0], skip_special_tokens=True).strip()
