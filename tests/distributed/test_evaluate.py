"""`ds-distill evaluate` on 2 ranks: BLEU and chrF are sacrebleu's on the files it writes, in the data's order;
a run's checkpoints score what its exported model scores (their data and settings read from the run's
config.yaml)."""

from __future__ import annotations

import json

import pytest
import sacrebleu

from tests.conftest import write_yaml
from tests.distributed.launch import free_port, launch

pytestmark = pytest.mark.distributed


def evaluate(tmp_path, name: str, model, config_path, *flags: str) -> dict:
    output = tmp_path / name
    config = [f"--config={config_path}"] if config_path else []  # without: the run's own config.yaml
    command = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--module", "ds_distill",
               "evaluate", f"--model={model}", *config, f"--output_dir={output}", *flags]  # fmt: skip
    launch(command, tmp_path / f"{name}.log")
    return json.loads((output / "report.json").read_text())


def test_evaluate_writes_what_it_scores_and_checkpoints_score_as_their_export(t5_zero2, tmp_path):
    """On the shared `t5_zero2` run: its export, and its checkpoints directory (exported first)."""
    run_dir, config = t5_zero2.dir, t5_zero2.config
    config_path = write_yaml(tmp_path / "eval.yaml", config)

    report = evaluate(tmp_path, "exported", run_dir / "model", config_path, "--max_new_tokens=12", "--num_beams=2",
                      f"--draft_for={config['teacher']['model_name_or_path']}", "--draft_prompts=4")  # fmt: skip
    hypotheses = (tmp_path / "exported" / "hypotheses.txt").read_text().splitlines()
    references = (tmp_path / "exported" / "references.txt").read_text().splitlines()
    raw = [json.loads(line)["translation"]["de"] for line in open(config["data"]["data_files"]["validation"])]
    assert references == raw  # every example once, in the file's order, although each rank scored half
    assert report["examples"] == len(raw) == len(hypotheses)
    assert report["generation"] == {"num_beams": 2, "max_new_tokens": 12}
    metrics = report["metrics"]
    assert metrics["bleu"] == sacrebleu.corpus_bleu(hypotheses, [raw]).score
    assert metrics["chrf"] == sacrebleu.corpus_chrf(hypotheses, [raw]).score > 0
    assert metrics["loss"] > 0 and metrics["perplexity"] > 1
    assert "eval (loss, generation): 100%" in (tmp_path / "exported.log").read_text()  # its progress bar
    # as the teacher's speculative draft: greedy assisted generation gave the teacher's own outputs
    assert metrics["draft/identical"] == 1.0 and metrics["draft/prompts"] == 4
    assert 0 <= metrics["draft/acceptance_rate"] <= 1 and metrics["draft/speedup"] > 0

    from_checkpoint = evaluate(  # its data and settings from the run's config.yaml
        tmp_path, "checkpoint", run_dir / "checkpoints", None, "--max_new_tokens=12", "--num_beams=2"
    )
    assert (tmp_path / "checkpoint" / "model" / "config.json").is_file()  # exported there first
    for name, value in metrics.items():
        if not name.startswith("draft/"):  # (measured only with --draft_for)
            assert from_checkpoint["metrics"][name] == pytest.approx(value, rel=1e-5), name


def test_a_run_measures_its_student_as_the_teachers_draft_at_each_evaluation(t5_zero2):
    """`train.eval_draft_for` (the shared `t5_zero2` run: its teacher) puts draft/* beside each evaluation."""
    from tests.distributed.launch import training_log

    evaluations = [row for row in training_log(t5_zero2.dir) if "eval/loss" in row]
    assert evaluations and all(row["eval/draft/identical"] == 1.0 for row in evaluations)
    assert all(0 <= row["eval/draft/acceptance_rate"] <= 1 and row["eval/draft/speedup"] > 0 for row in evaluations)
