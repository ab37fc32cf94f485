"""The README's first command: `ds-distill demo` runs end to end and the distilled student wins."""

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.distributed


def test_demo_distils_a_student_that_beats_training_without_the_teacher(tmp_path):
    result = run_cli("demo", f"--output_dir={tmp_path}", timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = {}
    for line in (tmp_path / "results.md").read_text().splitlines()[2:]:
        name, params, loss, bleu, speed = [cell.strip() for cell in line.strip("|").split("|")]
        rows[name] = {"params": float(params.rstrip("M")), "loss": float(loss), "bleu": float(bleu)}
    teacher, distilled, alone = rows["teacher"], rows["distilled student"], rows["no-teacher student"]
    assert teacher["params"] >= 4 * distilled["params"]
    assert distilled["params"] == alone["params"]
    assert distilled["loss"] < alone["loss"]
    assert teacher["loss"] < distilled["loss"]
    assert "beats the no-teacher student" in result.stdout

    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model_dir = tmp_path / "distilled" / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    output = model.generate(**tokenizer(["The big dog chased a cat."], return_tensors="pt"), max_new_tokens=20)
    assert tokenizer.decode(output[0], skip_special_tokens=True).strip()
