"""Students from the teacher's weights in real 2-rank runs: sliced under ZeRO-3, and HomoDistil under ZeRO-2.

The tiny T5 teacher (d_model 64, d_ff 128, 4 heads of 16, 2+2 blocks) distils into a student cut from it, and
HomoDistil prunes a full copy of it to d_model 48, d_ff 96 and 2 heads, killed mid-pruning and resumed.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSeq2SeqLM

from tests.conftest import translation_config
from tests.distributed.launch import distill, distill_until_first_checkpoint, losses, training_log

pytestmark = pytest.mark.distributed


def test_a_student_sliced_by_importance_trains_under_zero3(tiny, tmp_path):
    config = translation_config(
        tiny,
        tmp_path / "sliced",
        student={
            "init": {
                "from_teacher": {
                    "encoder_layers": 1, "decoder_layers": 1, "d_model": 32, "d_ff": 64, "num_heads": 2,
                    "strategy": "sliced", "width": "importance", "calibration_batches": 2,
                }
            },
            "deepspeed_config": "ds_configs/student_zero3.json",
        },
        train={"max_steps": 4, "save_steps": 0},
    )  # fmt: skip
    run_dir = distill(tmp_path, "sliced", config)
    provenance = json.loads((run_dir / "student_init" / "ds_distill_student.json").read_text())
    assert provenance["width"] == "importance" and provenance["layers"] == {"encoder": [0], "decoder": [0]}
    initial = load_file(run_dir / "student_init" / "model.safetensors")
    assert initial["shared.weight"].shape == (initial["shared.weight"].shape[0], 32)
    assert sorted(losses(run_dir)) == [1, 2, 3, 4]
    model = AutoModelForSeq2SeqLM.from_pretrained(run_dir / "model")
    assert model.config.d_model == 32 and model.config.num_layers == 1


def homodistil_config(tiny, output_dir) -> dict:
    config = translation_config(
        tiny,
        output_dir,
        student={"init": {"from_teacher": {"strategy": "sliced"}}, "deepspeed_config": "ds_configs/student_zero2.json"},
        train={"max_steps": 10, "save_steps": 4, "eval_steps": 10},
    )
    config["method"] = "homodistil"
    config["prune"] = {"d_model": 48, "d_ff": 96, "num_heads": 2, "steps": 6}
    del config["losses"]
    return config


def test_homodistil_prunes_to_the_target_exports_it_dense_and_resumes_exactly(tiny, tmp_path):
    reference = distill(tmp_path, "whole", homodistil_config(tiny, tmp_path / "whole"))
    model = AutoModelForSeq2SeqLM.from_pretrained(reference / "model")
    assert (model.config.d_model, model.config.d_ff, model.config.num_heads) == (48, 96, 2)
    assert {"loss/hidden_mse", "loss/attention_mse", "loss/embedding_mse"} <= set(training_log(reference)[-2])

    from ds_distill.config.load import from_dict
    from ds_distill.config.run import RunConfig
    from ds_distill.data import batches, tokenizers
    from ds_distill.data import tokenized as data
    from ds_distill.evaluation import evaluate

    run = from_dict(RunConfig, homodistil_config(tiny, reference))
    tokenizer = tokenizers.load_tokenizer(str(reference / "model"))
    validation = data.tokenize(run.data, tokenizer, data.load_raw(run.data))["validation"]
    scores = evaluate(model, validation, batches.make_collator(run.data, tokenizer, model), tokenizer, run)
    logged = [row for row in training_log(reference) if "eval/loss" in row][-1]["eval/loss"]
    assert scores["loss"] == pytest.approx(logged, rel=1e-5)  # the dense cut computes what the masked model did

    config = homodistil_config(tiny, tmp_path / "interrupted")
    distill_until_first_checkpoint(tmp_path, "interrupted", config)
    assert max(losses(tmp_path / "interrupted"), default=0) < 6  # killed while still pruning
    distill(tmp_path, "resumed", config, "--resume")
    assert losses(tmp_path / "interrupted") == pytest.approx(losses(reference), rel=1e-6)
    resumed = load_file(tmp_path / "interrupted" / "model" / "model.safetensors")
    for name, tensor in load_file(reference / "model" / "model.safetensors").items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-6, atol=1e-7)
