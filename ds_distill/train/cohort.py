"""Several students on one teacher pass: a run config with `students:` trains them all in one launch.

    ds-distill distill --config=students.yaml        # students: {small: {...}, small_cka: {...}}
    deepspeed --num_gpus 8 --module ds_distill distill --config=students.yaml

The teacher is the largest part of a distillation step and the same for every student of a sweep, so it is
loaded once and runs once per micro-batch, capturing the union of the features the students' terms read; each
student then takes its forward, backward and update under its own engine, optimizer and DeepSpeed JSON. Each
student is a run of its own in `train.output_dir/NAME` (log, TensorBoard, checkpoints, export, evaluation) and
trains as it would alone with the same seed and data: it keeps its own random-number state (dropout) across the
others' steps. The students save checkpoints at the same steps and resume together from the newest step all of
them completed.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from ds_distill import dist, models
from ds_distill.config.run import RunConfig
from ds_distill.errors import ConfigError
from ds_distill.train import checkpoint
from ds_distill.train.loop import Trainer
from ds_distill.train.prepare import Prepared, claim_output_dir, on_policy_options, prepare
from ds_distill.train.teacher import TeacherFeatures, load_teacher


def common_resume_tag(prepared: dict[str, Prepared]) -> str | None:
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


class Cohort:
    """The students' trainers around one teacher; `train()` runs them step by step and exports each."""

    def __init__(self, prepared: dict[str, Prepared], teacher=None):
        """`teacher`: an already loaded teacher engine to reuse (a benchmark), closed by its owner; by default the
        run's teacher is loaded here."""
        tag = common_resume_tag(prepared)  # before any weights load
        first = next(iter(prepared.values()))
        self.owns_teacher = teacher is None
        if teacher is None and first.teacher_ds:
            teacher = load_teacher(models.teacher_weights(first.run.teacher), first.teacher_ds)
        self.trainers: dict[str, Trainer] = {}
        self.rng: dict[str, dict] = {}
        for name, p in prepared.items():
            self.trainers[name] = Trainer(p, teacher=teacher, capture_teacher=False, resume_tag=tag)
            self.rng[name] = checkpoint.rng_state()  # as it seeded (or resumed) it
        self.teacher, self.teacher_side = teacher, None
        if first.run.teacher.cache:  # every student's trainer reads the one cache; the lead's batches carry it
            self.teacher_side = self.lead.teacher_side
        elif teacher is not None:
            keys = set().union(*(trainer.teacher_keys for trainer in self.trainers.values()))
            self.teacher_side = TeacherFeatures(teacher, first.teacher_ds, keys, first.run.train.torch_compile)
            for trainer in self.trainers.values():
                trainer.teacher_side = self.teacher_side  # its evaluation of a bare encoder reads the teacher

    @contextlib.contextmanager
    def own_rng(self, name: str):
        """The student's own random-number state while it works, so its dropout does not depend on the others."""
        checkpoint.set_rng_state(self.rng[name])
        try:
            yield self.trainers[name]
        finally:
            self.rng[name] = checkpoint.rng_state()

    @property
    def lead(self) -> Trainer:
        """The student whose batch stream serves all (every student's would be the same)."""
        return next(iter(self.trainers.values()))

    def train(self) -> dict[str, Path]:
        """Runs every student from the current step to the last, then exports each; returns the exports' paths."""
        self.begin()
        self.train_steps(until=self.lead.p.total_steps)
        exports = {}
        for name in self.trainers:
            with self.own_rng(name) as trainer:
                exports[name] = trainer.export_student()
        return exports

    def begin(self) -> None:
        for name in self.trainers:
            with self.own_rng(name) as trainer:
                trainer.begin(desc=name, stream=trainer is self.lead)

    def train_steps(self, until: int) -> None:
        """Optimizer steps of every student up to step `until`, each logging and saving on its schedule."""
        lead = self.lead
        while lead.step < until:
            self.optimizer_step([next(lead.stream) for _ in range(lead.train_config.gradient_accumulation_steps)])
            for name in self.trainers:
                with self.own_rng(name) as trainer:
                    trainer.finish_step()

    def optimizer_step(self, batches: list[dict]) -> None:
        """One teacher forward per micro-batch, then each student's micro-step on it."""
        tokens = {}
        for name, trainer in self.trainers.items():
            trainer.engine.module.set_step(trainer.step)
            tokens[name] = trainer.step_tokens(batches)
        for index, batch in enumerate(batches):
            batch = self.lead.to_device(batch)
            features = self.teacher_side.features(batch) if self.teacher_side is not None else None
            for name in self.trainers:
                with self.own_rng(name) as trainer:
                    trainer.micro_step(batch, features, tokens[name], last=index == len(batches) - 1)

    def close(self) -> None:
        for trainer in self.trainers.values():
            trainer.close()
        if self.teacher is not None and self.owns_teacher:
            self.teacher.destroy()


def train_students(runs: dict[str, RunConfig], resume: bool | str = False, overwrite: bool = False) -> dict[str, Path]:
    """Trains the students of one run config (`config.load.parse_students`) on one teacher pass; returns each
    export's path. Every student's checks pass before any output directory is claimed or any weights load."""
    dist.init(next(iter(runs.values())).train.ddp_timeout)
    prepared = {}
    for name, run in runs.items():
        if on_policy_options(run):
            raise ConfigError(
                f"students.{name}: losses.kd.on_policy: the teacher scores each student's own samples, so students "
                "cannot share its pass; train this one as a run of its own"
            )
        try:
            prepared[name] = prepare(run, claim=False)
        except ConfigError as error:
            raise ConfigError(f"students.{name}: {error}") from None
    kinds = {name: models.adapter_for(p.student_config).kind for name, p in prepared.items()}
    if len(set(kinds.values())) > 1:
        listed = ", ".join(f"{name}: {kind}" for name, kind in kinds.items())
        raise ConfigError(f"the students must be models of one kind to share batches ({listed})")
    prepared = {name: claim_output_dir(p, resume, overwrite) for name, p in prepared.items()}
    cohort = Cohort(prepared)
    try:
        return cohort.train()
    finally:
        cohort.close()
