"""Students from the teacher's weights in real 2-rank runs: sliced by importance under ZeRO-3, and HomoDistil
under ZeRO-2, both students of the session's shared cohort run (tests/references.py; test_cohort.py resumes it
while HomoDistil is still pruning).

The tiny T5 teacher (d_model 64, d_ff 128, 4 heads of 16, 2+2 blocks) distils into a student cut from it, and
HomoDistil prunes a full copy of it to d_model 48, d_ff 96 and 2 heads.
"""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file
from transformers import AutoModelForSeq2SeqLM

from tests.distributed.launch import losses, training_log

pytestmark = pytest.mark.distributed


def test_a_student_sliced_by_importance_trains_under_zero3(cohort):
    run_dir = cohort.dir / "sliced"
    provenance = json.loads((run_dir / "student_init" / "ds_distill_student.json").read_text())
    assert provenance["width"] == "importance" and provenance["layers"] == {"encoder": [0], "decoder": [0]}
    initial = load_file(run_dir / "student_init" / "model.safetensors")
    assert initial["shared.weight"].shape == (initial["shared.weight"].shape[0], 32)
    assert sorted(losses(run_dir)) == list(range(1, 13))
    model = AutoModelForSeq2SeqLM.from_pretrained(run_dir / "model")
    assert model.config.d_model == 32 and model.config.num_layers == 1


def test_homodistil_prunes_to_the_target_and_exports_it_dense(cohort):
    reference = cohort.dir / "homodistil"
    model = AutoModelForSeq2SeqLM.from_pretrained(reference / "model")
    assert (model.config.d_model, model.config.d_ff, model.config.num_heads) == (48, 96, 2)
    assert {"loss/hidden_mse", "loss/attention_mse", "loss/embedding_mse"} <= set(training_log(reference)[-2])

    from ds_distill.config.load import parse_students
    from ds_distill.data import batches, tokenizers
    from ds_distill.data import tokenized as data
    from ds_distill.train.scoring import score

    run = parse_students(cohort.config)["homodistil"]
    tokenizer = tokenizers.load_tokenizer(str(reference / "model"))
    validation = data.tokenize(run.data, tokenizer, data.load_raw(run.data))["validation"]
    scores = score(model, validation, batches.make_collator(run.data, tokenizer, model), tokenizer, run)
    logged = [row for row in training_log(reference) if "eval/loss" in row][-1]["eval/loss"]
    assert scores["loss"] == pytest.approx(logged, rel=1e-5)  # the dense cut computes what the masked model did
