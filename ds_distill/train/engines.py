"""The run's engines, built once the checks of prepare.py have passed: the loss terms for this model pair, the
student (cut from the teacher into output_dir/student_init where the run says so) wrapped with those terms in
one DeepSpeed engine, and the learning-rate schedule. The teacher's engine is loaded by train/teacher.py."""

from __future__ import annotations

from pathlib import Path

import torch

from ds_distill import dist, models
from ds_distill.config import deepspeed as ds_config
from ds_distill.data import alignment, batches, tokenizers
from ds_distill.objectives.cross_tokenizer import VocabularyMatch
from ds_distill.objectives.layerwise import LayerwiseLoss
from ds_distill.objectives.registry import build_losses
from ds_distill.surgery import students
from ds_distill.surgery.importance import activation_scores
from ds_distill.surgery.vocabulary import transplant
from ds_distill.train.prepare import Prepared, model_pair
from ds_distill.train.student import DistillationModule


def cut_student(p: Prepared, teacher) -> Path | None:
    """With `from_teacher.strategy: sliced`, the student cut from the teacher into output_dir/student_init
    (by rank 0, at the start of a run; a resumed run takes its weights from the checkpoint)."""
    run, train = p.run, p.run.train
    dims = run.student.init.from_teacher
    if dims is None or dims.strategy != "sliced":
        return None
    path = p.output_dir / "student_init"
    if p.resumes:  # the checkpoint holds the weights; the directory only gives the architecture
        return path if path.is_dir() else None
    split = p.datasets[run.data.train_split]
    rows = students.calibration_rows(
        len(split), train.per_device_train_batch_size, dims.calibration_batches, train.seed
    )

    # the teacher (or the model the student is cut from) reads its own tokens: across tokenizers, the teacher's,
    # whose packed rows are as long as the text of a student block takes (padded)
    teacher_tokenizer, ragged = p.teacher_tokenizer or p.tokenizer, p.teacher_tokenizer is not None

    def teacher_rows(batch: list[int]) -> list[dict]:
        return [alignment.teacher_row(split[i]) if p.teacher_tokenizer else split[i] for i in batch]

    def calibration(model):
        collate = batches.make_collator(run.data, teacher_tokenizer, model, rows_vary=ragged)
        return [collate(teacher_rows(batch)) for batch in rows]

    scores = None
    if dims.width == "importance" and not dims.source:
        # ranked on the teacher engine already loaded: each rank its share of the batches, sums added up
        share = students.rank_share(rows, dist.rank(), dist.world_size())
        collate = batches.make_collator(run.data, teacher_tokenizer, teacher.module, rows_vary=ragged)
        sums = activation_scores(teacher.module, (collate(teacher_rows(batch)) for batch in share))
        from deepspeed.accelerator import get_accelerator

        device = get_accelerator().current_device_name()
        scores = {key: dist.all_reduce_tensor(value.to(device)).cpu() for key, value in sorted(sums.items(), key=repr)}
    if dist.is_main():
        source = dims.source or models.teacher_weights(run.teacher)
        _, plan = students.make_student(source, path, dims, calibration, scores)
        dist.print_main(f"student cut from {source} ({dims.width} width) into {path}:\n{plan.summary()}")
        if dims.tokenizer:
            coverage = transplant(path, tokenizers.load_tokenizer(source), p.tokenizer)
            dist.print_main(f"its vocabulary, of {dims.tokenizer}: {coverage.summary()}")
    dist.barrier()
    return path


def loss_terms(p: Prepared) -> tuple[torch.nn.ModuleDict, dict[str, float]]:
    """The configured terms and weights for this student and teacher; prints each layer-wise term's pairs."""
    pair = model_pair(p.run, p.student_config, p.teacher_config)
    losses, weights = build_losses(p.run.losses, pair, vocab_size=len(p.tokenizer))
    if p.teacher_tokenizer is not None and "kd" in losses:  # across tokenizers: the tokens both vocabularies hold
        losses["kd"].vocabulary_match = VocabularyMatch.of(p.tokenizer, p.teacher_tokenizer)
    for name, loss in losses.items():
        if isinstance(loss, LayerwiseLoss):
            dist.print_main(f"losses.{name} layer pairs (student->teacher): {', '.join(map(str, loss.pairs))}")
            for note in loss.notes:
                dist.print_main(f"losses.{name}: {note}")
    return losses, weights


def student_engine(p: Prepared, student: torch.nn.Module, losses: torch.nn.ModuleDict, weights: dict[str, float]):
    """The student and its loss terms in one DeepSpeed engine (ZeRO-2 or ZeRO-3), with the run's schedule."""
    import deepspeed

    compile_student = p.run.train.torch_compile and ds_config.zero_stage(p.student_ds) < 3
    if p.run.train.torch_compile and not compile_student:
        dist.print_main("train.torch_compile: the ZeRO-3 student runs eagerly (weights gathered per module)")
    module = DistillationModule(student, losses, weights, compile=compile_student)
    engine, *_ = deepspeed.initialize(
        model=module,
        model_parameters=[q for q in module.parameters() if q.requires_grad],
        config=p.student_ds,
        lr_scheduler=lambda optimizer: lr_schedule(p, optimizer),
    )
    return engine


def lr_schedule(p: Prepared, optimizer):
    """Hugging Face's schedules: DeepSpeed's own start every run at their minimum rate and warm up over at
    least 2 steps, so `warmup_steps: 0` could not mean what it means in transformers."""
    from transformers import get_scheduler

    train = p.run.train
    return get_scheduler(
        train.lr_scheduler_type, optimizer, num_warmup_steps=train.warmup_steps, num_training_steps=p.total_steps
    )
