"""`ds-distill plan`: the step tracer (live tensors, the linear extension of traced peaks), the weight formulas,
the advice, and its predictions against peaks measured on an H100 (bench/results)."""

from __future__ import annotations

import json

import pytest
import torch

from ds_distill import models, planner
from ds_distill.config.load import load_config
from ds_distill.errors import ConfigError
from ds_distill.models import adapters
from ds_distill.planner import trace as step_trace
from tests.conftest import REPO, run_verb

H100 = planner.Hardware(gpus_per_node=1, nodes=1, gpu_memory_gb=80, cpu_memory_gb=1000)


def test_tracer_counts_new_storages_once_and_frees_them():
    weight = torch.ones(1000)
    tracker = step_trace.LiveTensorBytes()
    tracker.exclude([weight])
    with tracker:
        view = weight[:10]  # a view of an excluded storage: nothing new
        assert tracker.live == 0
        a = weight * 2  # 4,000 bytes
        b = a[100:].exp()  # 3,600
        c = a.view(10, 100)  # the same storage as a
        assert tracker.live == 7600
        del a, c
        assert tracker.live == 3600
        b.add_(1)  # in place: no new storage
    assert tracker.peak == 7600 and tracker.live == 3600
    assert view.shape == (10,)


def test_tracer_runs_16_bit_products_with_their_bytes():
    a, b = torch.ones(8, 16, dtype=torch.bfloat16), torch.ones(16, 4, dtype=torch.bfloat16)
    with step_trace.LiveTensorBytes() as tracker:
        out = a @ b
    assert out.dtype == torch.bfloat16 and tracker.peak == 8 * 4 * 2 and out[0, 0].item() == 16


def _tiny_t5_run(tmp_path, **train):
    from transformers import T5Config

    teacher = models.adapter_for(T5Config()).from_config(
        T5Config(vocab_size=512, d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=3, num_decoder_layers=3,
                 feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0)
    )  # fmt: skip
    teacher.save_pretrained(tmp_path / "teacher")
    return load_config(overrides={
        "teacher.model_name_or_path": str(tmp_path / "teacher"),
        "student.init.from_teacher": {"d_model": 32, "d_ff": 64, "num_heads": 2},
        "data.dataset": "json", "data.source_lang": "en", "data.target_lang": "de",
        "data.max_source_length": 24, "data.max_target_length": 16,
        "losses": {"ce": {"weight": 1.0}, "kd": {"weight": 1.0}},
        **{f"train.{key}": value for key, value in train.items()},
    })  # fmt: skip


@pytest.mark.parametrize("gpu", [False, True])
def test_traced_peak_grows_linearly_in_depth_and_batch(tmp_path, gpu):
    """The plan traces one and two blocks at batch 1 and 2; its extension to 3 + 3 blocks at batch 5 equals a
    direct trace of that model."""
    from ds_distill.objectives import logits
    from ds_distill.objectives.registry import build_losses
    from ds_distill.train.prepare import model_pair
    from ds_distill.train.student import student_hf_config

    run = _tiny_t5_run(tmp_path)
    teacher_config = models.load_config(run.teacher.model_name_or_path, "teacher")
    student_config = student_hf_config(run.student, teacher_config)
    adapter = models.adapter_for(student_config)
    losses, weights = build_losses(run.losses, model_pair(run, student_config, teacher_config), vocab_size=500)
    shape = step_trace.step_shape(run, adapter, 500, gpu)
    teacher_logits = (512, torch.float32)
    with logits.chunk_elements(40 * 500):  # chunks of 40 rows: the traces' 16 targets per example fill fewer
        step = step_trace.step_memory(student_config, adapter, shape, losses, weights, teacher_logits)
        direct = step_trace.trace_step(student_config, adapter, shape, losses, weights, teacher_logits, batch=5)
    assert adapter.depths(student_config) == {"encoder": 3, "decoder": 3}
    assert step.at(5) == pytest.approx(direct, rel=0.03)


def test_a_layer_wise_trace_goes_back_through_every_block_with_the_head_folded(tmp_path, monkeypatch):
    """Without logit terms the trace's stand-in loss is the last hidden state: with the LM head folded (its input
    in `head_input`) the backward recomputes and goes back through the blocks as it does with whole logits (an
    embedding-output stand-in traces half as much)."""
    from ds_distill.objectives import head
    from ds_distill.train.student import student_hf_config

    run = _tiny_t5_run(tmp_path, gradient_checkpointing=True)
    student_config = student_hf_config(run.student, models.load_config(run.teacher.model_name_or_path, "teacher"))
    adapter = models.adapter_for(student_config)
    shape = step_trace.step_shape(run, adapter, 500, False)
    folded = step_trace.trace_step(student_config, adapter, shape, {}, {}, None, batch=2)
    monkeypatch.setattr(head, "fold_head", lambda model, adapter: None)
    whole = step_trace.trace_step(student_config, adapter, shape, {}, {}, None, batch=2)
    assert 0.7 * whole < folded <= whole  # the whole logits add their own bytes


def test_gradient_checkpointing_holds_less(tmp_path):
    run = _tiny_t5_run(tmp_path, per_device_train_batch_size=4)
    plan = planner.make_plan(run, H100, vocab=500)
    assert plan.step_checkpointed.per_example < 0.8 * plan.step.per_example


def test_teacher_weights_per_placement():
    config = models.load_config("google/flan-t5-xl", "teacher")
    size = planner.ModelSize.of(config)
    eight = planner.Hardware(gpus_per_node=8, nodes=1, gpu_memory_gb=80, cpu_memory_gb=1000)
    places = {kind: planner.Placement.read(path, "teacher", bf16=True) for kind, path in
              {"replicated": "ds_configs/teacher_replicated_bf16.json",
               "zero3": "ds_configs/teacher_zero3_inference.json",
               "cpu": "ds_configs/teacher_zero3_inference_cpu.json"}.items()}  # fmt: skip
    assert size.params == pytest.approx(2849.8e6, rel=1e-4)
    assert size.largest_module == 32128 * 2048  # the embeddings (and the separate LM head)
    replicated = planner.teacher_cost(places["replicated"], size, eight)
    assert replicated.gpu["teacher"] == size.params * 2
    assert sum(replicated.host.values()) == 8 * size.params * 2  # every rank loads a copy before moving it
    gathered = 2 * (size.largest_module + 5e7 + size.small)  # running module, prefetch bucket, small weights
    assert planner.teacher_cost(places["zero3"], size, eight).gpu["teacher"] == size.params * 2 / 8 + gathered
    offload = planner.teacher_cost(places["cpu"], size, eight)
    assert offload.gpu["teacher"] == gathered and sum(offload.host.values()) == size.params * 2


def test_student_states_are_deepspeeds_estimates_plus_gradient_buckets():
    size = planner.ModelSize(params=146_000_000, largest_module=16_000_000, small=0)
    zero2 = planner.Placement.read("ds_configs/student_zero2.json", "student", bf16=True)
    cost = planner.student_cost(zero2, size, H100, loads_partitioned=False, gpu=True)
    # bf16 weights (2) + 18 bytes per parameter on one GPU; two 5e7-element bf16 buckets (overlap_comm)
    assert cost.gpu["student states"] == 20 * size.params + 2 * 5e7 * 2
    fp32 = planner.Placement.read("ds_configs/student_zero2.json", "student", bf16=False)
    cost = planner.student_cost(fp32, size, H100, loads_partitioned=False, gpu=True)
    assert cost.gpu["student states"] == 24 * size.params + 2 * 5e7 * 4


@pytest.mark.parametrize("row", [("fused", 0), ("fused", 4), ("eager", 1)])
def test_plan_predicts_the_peaks_measured_on_an_h100(row, monkeypatch):
    """Three of bench/plan_vs_measured.py's twelve rows: all twelve are within 0.6%; 5% is held here (the goal is
    15%), so a change that drops a part of the step (as counting T5's attention as fused would: -10%) fails.
    They were measured with the logit terms as first written and the head unfolded, so the step is traced so."""
    from bench.gpu_throughput import PLACEMENTS, TOKENIZER_PIECES
    from ds_distill.objectives import head, logits, registry
    from tests.unit.test_losses import full_tensor_reference

    name, index = row
    measured = json.loads((REPO / f"bench/results/gpu_throughput_h100_{name}.json").read_text())["runs"][index]
    if name == "eager":  # taken before the fused norm and GELU kernels
        monkeypatch.setattr(adapters, "use_fused_kernels", lambda model: None)

    def measured_logit_terms(losses, weights, student, teacher, tokens):
        """The logit terms of the measured runs: float32 copies of the whole logits (before the chunked terms)."""
        total = 0.0
        for name, loss in losses.items():
            kind = "ce" if name == "ce" else loss.options.divergence
            temperature = 1.0 if name == "ce" else loss.options.temperature
            logits = student["logits"], (teacher or student)["logits"]
            vocab = loss.vocab_size
            total = total + weights[name] * full_tensor_reference(kind, *logits, student["labels"], temperature, vocab)
        return total, {}

    monkeypatch.setattr(registry, "weighted_terms", measured_logit_terms)
    monkeypatch.setattr(head, "fold_head", lambda model, adapter: None)
    monkeypatch.setattr(logits, "CHUNK_ELEMENTS", 1)  # traced at batch 1 and 2, as then
    run = load_config(recipe="flan_t5_3b_145m", overrides={
        "method": measured["method"], "teacher.deepspeed_config": PLACEMENTS[measured["placement"]],
        "train.per_device_train_batch_size": measured["batch"],
    })  # fmt: skip
    plan = planner.make_plan(run, H100, vocab=TOKENIZER_PIECES)
    (option,) = [
        o for o in plan.options if o.teacher.path == PLACEMENTS[measured["placement"]] and o.student.kind == "zero2"
    ]
    assert sum(option.gpu.values()) / planner.GB == pytest.approx(measured["peak_memory_gb"], rel=0.05)


def test_advice_picks_the_fastest_that_fits_or_a_smaller_micro_batch():
    run = load_config(recipe="flan_t5_3b_145m", overrides={"train.per_device_train_batch_size": 64})
    roomy = planner.make_plan(run, planner.Hardware(8, 1, 80, 1000))
    best = roomy.best()
    assert (best.teacher.kind, best.student.kind) == ("replicated", "zero2")
    assert "--teacher.deepspeed_config=ds_configs/teacher_replicated_bf16.json" in planner.report(roomy)

    tight = planner.make_plan(run, planner.Hardware(1, 1, 8, 1000))  # 64 pairs of 128 + 128 tokens: ~13 GB
    assert tight.best() is None
    advice = "\n".join(planner.advice(tight))
    assert "nothing fits at micro-batch 64" in advice and "--train.gradient_accumulation_steps=" in advice
    micro = int(advice.split("--train.per_device_train_batch_size=")[1].split()[0])
    assert 1 <= micro < 64

    no_host = planner.make_plan(run, planner.Hardware(8, 1, 80, 20))  # 8 ranks each load a 5.3 GB copy
    assert all(not o.fits_host for o in no_host.options if o.teacher.kind == "replicated")
    assert no_host.best().teacher.kind == "zero3"


def test_bad_hardware_is_refused():
    with pytest.raises(ConfigError, match="--gpus_per_node must be a whole number"):
        planner.Hardware(0, 1, 80, 100)
    with pytest.raises(ConfigError, match="--gpu_memory_gb must be a positive number"):
        planner.Hardware(1, 1, -1, 100)


def test_plan_command(tmp_path):
    result = run_verb("plan", "--recipe=flan_t5_3b_145m", "--gpus_per_node=8", "--gpu_memory_gb=80",
                     "--cpu_memory_gb=1000")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "fastest that fits: teacher replicated" in result.stdout
    assert "--student.deepspeed_config=ds_configs/student_zero2.json" in result.stdout
    result = run_verb("plan", "--recipe=flan_t5_3b_145m", "--gpus_per_node=0")
    assert result.returncode == 2 and "--gpus_per_node must be a whole number" in result.stderr


def test_plan_of_a_chain_plans_every_stage(capsys):
    from ds_distill import cli

    cli.main(["plan", "--recipe=flan_t5_3b_chain", "--gpus_per_node=8", "--gpu_memory_gb=40", "--cpu_memory_gb=500"])
    out = capsys.readouterr().out
    assert "stage l12:" in out and "stage l6:" in out
    assert "teacher stage l12: 424.5M parameters" in out  # the second stage's teacher is the first's export
    assert out.count("--defaults.teacher.deepspeed_config=ds_configs/teacher_replicated_bf16.json") == 2


def test_a_plan_of_several_students_counts_the_teacher_once_and_every_student(tiny, tmp_path):
    """students: the teacher's weights once, the students' states added up, the larger step of the two."""
    from ds_distill.config.load import parse_students
    from tests.conftest import translation_config

    tree = translation_config(tiny, tmp_path / "runs")
    tree["students"] = {"small": {}, "wide": {"student": {"init": {"from_teacher": {"d_model": 64, "num_heads": 4}}}}}
    runs = parse_students(tree)
    together = planner.make_students_plan(runs, H100, vocab=1000)
    alone = {name: planner.make_plan(run, H100, vocab=1000) for name, run in runs.items()}
    assert together.student_size.params == sum(plan.student_size.params for plan in alone.values())
    assert len(together.options) == len(alone["small"].options)
    for option in together.options:
        parts = [next(o for o in plan.options if (o.teacher.path, o.student.path) == (option.teacher.path,
                      option.student.path)) for plan in alone.values()]  # fmt: skip
        assert option.gpu["teacher"] == parts[0].gpu["teacher"] == parts[1].gpu["teacher"]
        assert option.gpu["student states"] == pytest.approx(sum(p.gpu["student states"] for p in parts))
        assert option.gpu["step"] == max(p.gpu["step"] for p in parts) == parts[1].gpu["step"]
    assert "students: small" in planner.report(together)
