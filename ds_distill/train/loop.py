"""The distillation run, top to bottom: prepare -> load the teacher and each student's engine -> train -> export.

    ds-distill distill --config=RUN.yaml [--train.max_steps=10] [--resume | --overwrite]
    ds-distill distill --config=students.yaml        # students: {small: {...}, small_cka: {...}}
    deepspeed --num_gpus 2 --module ds_distill distill --config=RUN.yaml

A run trains one student, or several (`students:`) on one teacher pass: the teacher is the largest part of a
step and the same for every student of a sweep, so it is loaded once and runs once per micro-batch, capturing the
union of the features the students' terms read. Each student then takes its forward, backward and update under
its own engine, optimizer and DeepSpeed JSON, and is a run of its own in its output_dir (train/student_run.py).
It trains as it would alone with the same seed and data: it keeps its own random-number state (dropout) across
the others' steps. On-policy KD scores each student's own samples with the teacher, so on those micro-batches the
teacher's forward is paid once per student. The students save checkpoints at the same steps and resume together
from the newest step all of them completed.

One optimizer step is `Trainer.optimizer_step`. Everything that can be checked without weights is checked first
(train/prepare.py); the engines are built by train/engines.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ds_distill import dist, models
from ds_distill.config.run import RunConfig
from ds_distill.data import alignment, batches
from ds_distill.errors import ConfigError
from ds_distill.objectives import cross_tokenizer
from ds_distill.objectives.features import target_index
from ds_distill.train import checkpoint, on_policy
from ds_distill.train.prepare import Prepared, prepare_students
from ds_distill.train.progress import peak_memory_gb, run_summary
from ds_distill.train.student_run import StudentRun
from ds_distill.train.teacher import TeacherFeatures, load_teacher
from ds_distill.train.teacher_cache import CachedTeacher


def resume_tag(prepared: dict[str, Prepared]) -> str | None:
    """The newest checkpoint every student completed (a kill can fall between two students' saves); None when
    none resumes. Refused when only some have checkpoints, or none in common."""
    resuming = {name for name, p in prepared.items() if p.resumes}
    if not resuming:
        return None
    if resuming != set(prepared):
        fresh = ", ".join(sorted(set(prepared) - resuming))
        raise ConfigError(
            f"students {fresh} have no checkpoint to resume from while the others do; they resume together"
        )
    tags = [set(checkpoint.complete_tags(p.output_dir / "checkpoints")) for p in prepared.values()]
    common = set.intersection(*tags)
    if not common:
        raise ConfigError("the students have no checkpoint step in common to resume from; start with --overwrite")
    return max(common, key=lambda tag: int(tag.split("_")[1]))


class Trainer:
    """A run's students around one teacher (or its cache); `train()` runs them from their current step to the last
    and exports each."""

    def __init__(self, prepared: Prepared | dict[str, Prepared], teacher=None):
        """`prepared`: the run's one student, or {name: student} (`students:`), prepared alike
        (`prepare_students`); `teacher`: an already loaded teacher engine to reuse (a benchmark comparing
        objectives on one teacher), closed by its owner; by default the run's teacher is loaded here."""
        prepared = prepared if isinstance(prepared, dict) else {"": prepared}
        tag = resume_tag(prepared)  # before any weights load
        first = self.p = next(iter(prepared.values()))
        # what the models and the step add to this is what `ds-distill plan` predicts
        self.memory_before_models_gb = peak_memory_gb(reset=True)
        self.owns_teacher = teacher is None
        if teacher is None and first.teacher_ds:
            teacher = load_teacher(models.teacher_weights(first.run.teacher), first.teacher_ds)
        self.teacher = teacher
        several = len(prepared) > 1
        drafts = {}  # train.eval_draft_for's models, one copy for all the students
        self.students = [StudentRun(p, teacher, name, tag, own_rng=several, draft_targets=drafts)
                         for name, p in prepared.items()]  # fmt: skip
        self.adapter = self.students[0].adapter  # the students are of one kind: they share the batches
        self.device = self.students[0].device
        self.teacher_side = None
        if first.run.teacher.cache:
            self.teacher_side = CachedTeacher(first.run.teacher.cache, self.adapter)
        elif teacher is not None and any(student.reads_teacher for student in self.students):
            keys = set().union(*(student.teacher_keys for student in self.students))
            self.teacher_side = TeacherFeatures(teacher, first.teacher_ds, keys, first.run.train.torch_compile)
        self.batches = self._train_batches()
        self.stream = None

    def _train_batches(self) -> batches.TrainBatches:
        p, data, train = self.p, self.p.run.data, self.p.run.train
        collate = self.students[0].collate
        if p.teacher_tokenizer is not None:  # the training rows hold the teacher's tokens too
            shifts = tuple(int(models.adapter_for(c).kind == "causal") for c in (p.student_config, p.teacher_config))
            teacher_collate = batches.make_collator(data, p.teacher_tokenizer, self.teacher.module, rows_vary=True)
            collate = alignment.AlignedCollator(collate, teacher_collate, shifts)
        on_gpu = self.device.type != "cpu"
        workers, grouped = train.dataloader_num_workers, train.group_by_length
        return batches.TrainBatches(
            p.datasets[data.train_split],
            collate,
            train.per_device_train_batch_size,
            train.seed,
            num_workers=(2 if on_gpu else 0) if workers is None else workers,
            pin_memory=on_gpu and train.dataloader_pin_memory,
            group_by_length=data.generates_from_sources() if grouped is None else grouped,
            teacher_rows=self.teacher_side.rows if isinstance(self.teacher_side, CachedTeacher) else None,
        )

    # -- one step -----------------------------------------------------------------------------------------
    def optimizer_step(self, data: list[dict[str, torch.Tensor]]) -> None:
        """One optimizer step of every student over the step's micro-batches (on the host).

        Per micro-batch: the teacher's forward under no_grad (once for all students on the data's micro-batch;
        once per student on its own samples) -> the student's forward and loss terms (one engine forward) ->
        backward -> engine step (DeepSpeed updates the weights after the last micro-batch).

        Every term is a mean over all tokens of the step, on all ranks: each micro-batch contributes its sum over
        the step's count, and since DeepSpeed averages gradients over ranks, each rank's share is scaled by the
        world size (and not divided by the accumulation steps).
        """
        steps = {}
        for student in self.students:
            with student.own_rng():  # sampling draws from it
                steps[student.name] = student.step_batches(data)
        for index, batch in enumerate(data):
            shared = None  # the data's micro-batch on the device with the teacher's features: once for all
            for student in self.students:
                step = steps[student.name]
                sampled = step.sampled[index]
                if sampled:  # its own samples, which the teacher scores for it alone
                    own, teacher_features = self.with_teacher(step.batches[index])
                else:
                    shared = shared or self.with_teacher(batch)
                    own, teacher_features = shared
                with student.own_rng():  # dropout
                    only = on_policy.TERMS if sampled else None  # its own samples: the KD term alone
                    total, terms = student.engine(own, teacher_features, step.tokens, only)
                    student.engine.backward(total * dist.world_size(), scale_wrt_gas=False)
                    if index == len(data) - 1:
                        student.observe_pruning()  # the step's gradient is complete
                    student.engine.step()
                student.add_to_window(total, terms, sampled)

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch on the device, with the target positions' flat indices computed on the host."""
        if batch.get("labels") is not None:
            index = target_index(self.adapter, batch["labels"])
            batch = {**batch, "target_index": index.pin_memory() if self.device.type != "cpu" else index}
            if "align_group" in batch:  # a logit chunk ends only between groups
                batch["chunk_breaks"] = cross_tokenizer.chunk_breaks(batch["align_group"].flatten()[index])
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def with_teacher(self, batch: dict[str, torch.Tensor]):
        """(the batch on the device, the teacher's features of it)."""
        on_device = self.to_device(batch)
        return on_device, self.teacher_features(on_device)

    def teacher_features(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """What the students' terms read of the teacher on `batch` (on the device); None without a teacher."""
        return self.teacher_side.features(batch) if self.teacher_side is not None else None

    # -- the loop -----------------------------------------------------------------------------------------
    def train(self) -> dict[str, Path]:
        """Runs every student from its current step to the last, then exports each; returns {name: export}."""
        if dist.is_main():
            for student in self.students:
                dist.print_main(run_summary(student.p, resumed_at=student.step))
        self.begin()
        self.train_steps(until=self.p.total_steps)
        exports = {}
        for student in self.students:
            with student.own_rng():
                exports[student.name] = student.export()
        return exports

    def begin(self) -> None:
        """Writes each student's run files and opens the batch stream at the (possibly resumed) position."""
        for student in self.students:
            with student.own_rng():
                student.begin(self.memory_before_models_gb)
        self.stream = self.batches.iterate(self.students[0].micro_batches_done)

    def train_steps(self, until: int) -> None:
        """Optimizer steps up to step `until`; each student logs, evaluates and saves on its schedule."""
        accumulation = self.p.run.train.gradient_accumulation_steps
        while self.students[0].step < until:
            self.optimizer_step([next(self.stream) for _ in range(accumulation)])
            for student in self.students:
                with student.own_rng():
                    student.finish_step(self.teacher_features)

    def close(self) -> None:
        """Ends the run in order: collating workers stopped, each student's log and engine closed, the teacher's
        hooks removed and, where this run loaded it, its engine released."""
        self.stream = None  # the DataLoader iterator: its workers exit with it
        for student in self.students:
            student.close()
        if isinstance(self.teacher_side, TeacherFeatures):
            self.teacher_side.capture.remove()  # a reused teacher serves the next run without them
        if self.teacher is not None and self.owns_teacher:
            self.teacher.destroy()


def train_students(runs: dict[str, RunConfig], resume: bool | str = False, overwrite: bool = False) -> dict[str, Path]:
    """Trains the students of one run config (`config.load.parse_students`) on one teacher pass; returns each
    export's path. Every student's checks pass before any output directory is claimed or any weights load."""
    dist.init(next(iter(runs.values())).train.ddp_timeout)
    trainer = Trainer(prepare_students(runs, resume, overwrite))
    try:
        return trainer.train()
    finally:
        trainer.close()


def train_student(run: RunConfig, resume: bool | str = False, overwrite: bool = False) -> Path:
    """Runs one distillation (or, without a teacher, plain training) and returns the exported student's path."""
    return train_students({"": run}, resume=resume, overwrite=overwrite)[""]
