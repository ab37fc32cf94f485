"""Real `deepspeed` launches with 2 CPU ranks on tiny models: parity, resume, export, three model families.

Each run trains a student under its own ZeRO-2 or ZeRO-3 engine beside a teacher under ZeRO-3 inference with
CPU offload, on the shared WMT sample with a sentencepiece tokenizer trained by the fixtures. The ZeRO-2 and
ZeRO-3 T5 runs and the GPT-2 run are the session's shared references (tests/references.py).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_cli, run_verb, translation_config, write_yaml
from tests.distributed.launch import (
    distill,
    distill_until_first_checkpoint,
    free_port,
    launch,
    losses,
    training_log,
)
from tests.references import cut_back

pytestmark = pytest.mark.distributed


@pytest.fixture
def runs(t5_zero2, t5_zero3):
    """The same distillation with the student under ZeRO-2 and under ZeRO-3: {stage: (output_dir, config)}."""
    return {2: (t5_zero2.dir, t5_zero2.config), 3: (t5_zero3.dir, t5_zero3.config)}


def test_zero2_and_zero3_students_give_the_same_losses(runs):
    zero2, zero3 = losses(runs[2][0]), losses(runs[3][0])
    assert sorted(zero2) == list(range(1, 13))
    for step in zero2:
        assert zero3[step] == pytest.approx(zero2[step], rel=1e-5), step
    assert zero2[12] < zero2[1]  # it learns
    eval2 = [row for row in training_log(runs[2][0]) if "eval/loss" in row][-1]
    eval3 = [row for row in training_log(runs[3][0]) if "eval/loss" in row][-1]
    assert eval3["eval/loss"] == pytest.approx(eval2["eval/loss"], rel=1e-5)
    assert "eval/bleu" in eval2


def test_learning_rate_follows_the_hugging_face_linear_schedule(runs):
    """warmup_steps 2 of max_steps 12: 0 at the first step, then linear up and down (the logged rate is the
    next step's, as in transformers)."""
    logged = {row["step"]: row["lr"] for row in training_log(runs[2][0]) if "lr" in row}
    peak = runs[2][1]["train"]["learning_rate"]
    expected = {step: peak * (step / 2 if step < 2 else (12 - step) / 10) for step in range(1, 13)}
    assert logged == pytest.approx(expected, rel=1e-6)


def test_a_run_says_what_it_does_at_its_start_and_little_else(t5_zero2):
    """One block before the first step (both models, the data, steps and batch, its files, how to resume); no
    DeepSpeed op-build lines, torch deprecation warnings or shard-writing bars; evaluation on lines of its own."""
    log = t5_zero2.log.read_text()
    config = t5_zero2.config
    for line in ("teacher  ", "; ZeRO-3 partitioned over 2 ranks, parameters in CPU memory\n",
                 "student  random: t5 (seq2seq), ", "; ZeRO-2 over 2 ranks\n",
                 f"data     json (translation): train {config['data']['max_train_samples']} rows, validation ",
                 "steps    12; 16 examples a step (4 per rank x 2 accumulated x 2 ranks)\n",
                 f"watch    tensorboard --logdir {t5_zero2.dir / 'tensorboard'}\n", "resume   the same command"):  # fmt: skip
        assert line in log, line
    for noise in ("built successfully", "FutureWarning", "Writing model shards"):
        assert noise not in log, noise
    evaluations = [line for line in log.splitlines() if "eval loss" in line]
    assert evaluations and all(line.startswith("step ") for line in evaluations)


def test_every_term_reaches_tensorboard(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(runs[2][0] / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "loss/ce", "loss/kd", "lr", "tokens_per_s", "peak_memory_gb", "eval/loss"} <= tags


@pytest.mark.parametrize("stage", [2, 3])
def test_exported_student_reloads_with_the_trained_weights_and_generates(runs, stage):
    """The export scores on the validation set what the run's last evaluation, on the live engine, scored."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from ds_distill.config.run import RunConfig
    from ds_distill.config.typed import from_dict
    from ds_distill.data import batches
    from ds_distill.data import tokenized as data
    from ds_distill.train.scoring import score

    run_dir, config = runs[stage]
    model_dir = run_dir / "model"
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= set(
        os.listdir(model_dir)
    )
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert model.config.d_model == 32 and model.config.num_layers == 1
    run = from_dict(RunConfig, {**config, "train": {**config["train"], "eval_metric": "loss"}})
    validation = data.tokenize(run.data, tokenizer, data.load_raw(run.data))["validation"]
    scores = score(model, validation, batches.make_collator(run.data, tokenizer, model), tokenizer, run)
    logged = [row for row in training_log(run_dir) if "eval/loss" in row][-1]["eval/loss"]
    assert scores["loss"] == pytest.approx(logged, rel=1e-5)
    inputs = tokenizer(["translate English to German: The house is small."], return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=8)
    assert generated.shape[0] == 1 and generated.shape[1] > 1


def test_zero2_and_zero3_exports_hold_the_same_weights(runs):
    zero2 = load_file(runs[2][0] / "model" / "model.safetensors")
    zero3 = load_file(runs[3][0] / "model" / "model.safetensors")
    assert zero2.keys() == zero3.keys()
    for name in zero2:
        torch.testing.assert_close(zero3[name], zero2[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stage", [2, 3])
def test_export_verb_turns_the_checkpoint_into_the_same_model(runs, stage, tmp_path):
    run_dir = runs[stage][0]
    result = run_verb("export", f"--checkpoint_dir={run_dir / 'checkpoints'}", f"--output_dir={tmp_path / 'exported'}")
    assert result.returncode == 0, result.stderr[-3000:]
    final = load_file(run_dir / "model" / "model.safetensors")
    exported = load_file(tmp_path / "exported" / "model.safetensors")
    for name in final:
        torch.testing.assert_close(exported[name], final[name])


def test_killed_run_resumes_to_the_uninterrupted_result(runs, tmp_path):
    """Kill -9 a run after its first checkpoint, resume it, and compare with the uninterrupted ZeRO-2 run."""
    reference_dir, reference_config = runs[2]
    config = json.loads(json.dumps(reference_config))
    config["train"]["output_dir"] = str(tmp_path / "interrupted")
    distill_until_first_checkpoint(tmp_path, "interrupted", config)
    killed_at = max(losses(tmp_path / "interrupted"), default=0)
    assert 4 <= killed_at < 12

    distill(tmp_path, "resumed", config, "--resume")
    assert losses(tmp_path / "interrupted") == pytest.approx(losses(reference_dir), rel=1e-6)
    resumed = load_file(tmp_path / "interrupted" / "model" / "model.safetensors")
    reference = load_file(reference_dir / "model" / "model.safetensors")
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], rtol=1e-6, atol=1e-7)


def test_same_output_dir_without_resume_or_overwrite_is_refused(runs, tmp_path):
    path = write_yaml(tmp_path / "again.yaml", runs[2][1])
    result = run_cli("distill", f"--config={path}")
    assert result.returncode == 2
    assert "already holds this run's checkpoints; pass --resume" in result.stderr


def test_a_resume_takes_only_a_longer_run_and_its_first_step_trains_at_the_new_schedules_rate(t5_zero2, tmp_path):
    """The finished 12-step run, resumed from its last checkpoint for one more step: the optimizer came back with
    the rate the 12-step schedule ended at (0), and the 13th step trains at the 13-step schedule's instead (the
    weights move). Settings that would make it another run are refused by name, with --resume and --resume=auto."""
    config = cut_back(t5_zero2, tmp_path / "run", 12)
    peak = config["train"]["learning_rate"]
    for flags, named in ((["--resume"], "train.learning_rate 0.001 -> 0.0005"),
                         (["--resume=auto"], "train.learning_rate 0.001 -> 0.0005, train.max_steps 12 -> 13")):  # fmt: skip
        changed = {**config, "train": {**config["train"], "learning_rate": peak / 2, "max_steps": 13}}
        refused = run_cli("distill", f"--config={write_yaml(tmp_path / 'changed.yaml', changed)}", *flags)
        assert refused.returncode == 2 and named in refused.stderr, refused.stderr[-3000:]
        assert "Traceback" not in refused.stderr

    longer = {**config, "train": {**config["train"], "max_steps": 13}}
    distill(tmp_path, "longer", longer, "--resume")
    assert sorted(losses(tmp_path / "run")) == list(range(1, 14))
    assert [row["lr"] for row in training_log(tmp_path / "run") if "lr" in row][-1] == 0.0  # the schedule's end
    before = load_file(t5_zero2.dir / "model" / "model.safetensors")
    after = load_file(tmp_path / "run" / "model" / "model.safetensors")
    moved = max((after[name] - before[name]).abs().max().item() for name in before)
    assert moved > 0.1 * peak / 11  # step 13, at peak / 11, moved the weights (at rate 0 none would)


def test_torchrun_and_the_deepspeed_launcher_train_the_same_decoder_only_student(gpt2_zero3, tmp_path):
    config = {**gpt2_zero3.config, "train": {**gpt2_zero3.config["train"], "output_dir": str(tmp_path / "torchrun")}}
    path = write_yaml(tmp_path / "torchrun.yaml", config)
    torchrun = ["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "ds_distill"]
    launch([*torchrun, "distill", f"--config={path}"], tmp_path / "torchrun.log")

    assert sorted(losses(tmp_path / "torchrun")) == [1, 2, 3, 4]
    assert losses(tmp_path / "torchrun") == pytest.approx(losses(gpt2_zero3.dir), rel=1e-6)
    by_torchrun = load_file(tmp_path / "torchrun" / "model" / "model.safetensors")
    by_deepspeed = load_file(gpt2_zero3.dir / "model" / "model.safetensors")
    for name in by_deepspeed:
        torch.testing.assert_close(by_torchrun[name], by_deepspeed[name], rtol=1e-6, atol=1e-7)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "torchrun" / "model")
    assert model.config.n_layer == 1 and model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3).shape == (1, 6)


def test_encoder_only_family_learns_and_its_export_reloads(tiny, tmp_path):
    config = translation_config(
        tiny,
        tmp_path / "bert",
        teacher={"model_name_or_path": str(tiny["bert"])},
        student={"init": {"from_teacher": {"encoder_layers": 1, "d_model": 32, "d_ff": 64, "num_heads": 2}}},
        data={"task": "masked_lm", "dataset": "text", "data_files": tiny["text"], "max_source_length": 32},
        losses={"ce": {"weight": 1.0}, "kd": {"weight": 1.0, "divergence": "jsd", "beta": 0.5}},
        train={"max_steps": 16, "save_steps": 0, "learning_rate": 3e-3},
    )
    run_dir = distill(tmp_path, "bert", config)
    logged = losses(run_dir)
    assert sorted(logged) == list(range(1, 17))
    first, last = [logged[s] for s in (1, 2, 3)], [logged[s] for s in (14, 15, 16)]
    assert sum(last) < 0.97 * sum(first)  # masked-token loss falls
    assert [row for row in training_log(run_dir) if "eval/loss" in row]
    from transformers import AutoModelForMaskedLM, AutoTokenizer, DataCollatorForLanguageModeling

    model = AutoModelForMaskedLM.from_pretrained(run_dir / "model").eval()
    assert model.config.num_hidden_layers == 1
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    texts = open(tiny["text"]["validation"]).read().splitlines()[:32]
    collate = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, seed=0)
    batch = collate([tokenizer(text, truncation=True, max_length=32) for text in texts])
    torch.manual_seed(0)
    untrained = AutoModelForMaskedLM.from_config(model.config).eval()
    with torch.no_grad():
        assert model(**batch).loss < untrained(**batch).loss - 0.3  # the export holds what training learned
