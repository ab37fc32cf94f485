"""The distillation run, top to bottom: prepare -> load both engines -> train -> export.

    ds-distill distill --config=RUN.yaml [--train.max_steps=10] [--resume | --overwrite]
    deepspeed --num_gpus 2 --module ds_distill distill --config=RUN.yaml

One optimizer step (`Trainer.optimizer_step`) = `gradient_accumulation_steps` micro-batches, each: teacher
forward under no_grad -> student engine forward (student features + every loss term) -> backward -> step
(DeepSpeed applies the update on the accumulation boundary). Everything that can be checked without weights is
checked first (train/prepare.py); the engines are built by train/engines.py.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ds_distill import dist, models
from ds_distill.config import deepspeed as ds_config
from ds_distill.config.run import RunConfig
from ds_distill.data import alignment, batches
from ds_distill.objectives import cross_tokenizer
from ds_distill.objectives.features import target_index, token_counts
from ds_distill.surgery import prune
from ds_distill.train import checkpoint, engines, export, on_policy, scoring
from ds_distill.train.prepare import Prepared, on_policy_options, prepare, write_run_files
from ds_distill.train.progress import LogWindow, RunLog, memory_in_use_gb, peak_memory_gb, run_summary
from ds_distill.train.student import build_student
from ds_distill.train.teacher import TeacherFeatures, load_teacher
from ds_distill.train.teacher_cache import CachedTeacher


class Trainer:
    """Owns both engines and the loop; `train()` runs from the current step to the last and exports."""

    def __init__(self, p: Prepared, teacher=None, capture_teacher: bool = True, resume_tag: str | None = None):
        """`teacher`: an already loaded teacher engine to reuse (a benchmark comparing objectives on one
        teacher, several students on one teacher pass); by default the run's teacher is loaded here.
        `capture_teacher=False`: the caller sets `teacher_side` (one teacher pass for several students, capturing
        the union of their `teacher_keys`). `resume_tag`: the checkpoint to resume from, else the newest."""
        from transformers import set_seed

        self.p, self.run, self.train_config = p, p.run, p.run.train
        # what the models and the step add to this is what `ds-distill plan` predicts
        self.memory_before_models_gb = peak_memory_gb(reset=True)
        self.owns_teacher = teacher is None
        if teacher is None and p.teacher_ds:
            teacher = load_teacher(models.teacher_weights(self.run.teacher), p.teacher_ds)
        self.teacher = teacher
        seed = self.train_config.seed
        student = build_student(self.run.student, p.student_config, p.student_ds, seed, engines.cut_student(p, teacher))
        student.generation_config = p.generation_config  # evaluation generates as the export will
        if self.train_config.gradient_checkpointing:
            # non-reentrant: gradients also flow into features captured inside a checkpointed block
            student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        losses, weights = engines.loss_terms(p)
        self.teacher_side = None
        self.teacher_keys = set().union(*(loss.teacher_keys for loss in losses.values()))
        reads_teacher = any(loss.requires_teacher for loss in losses.values())  # CE alone: the teacher only cut it
        if teacher is not None and capture_teacher and reads_teacher:
            compile_teacher = self.train_config.torch_compile
            self.teacher_side = TeacherFeatures(teacher, p.teacher_ds, self.teacher_keys, compile_teacher)
        self.engine = engines.student_engine(p, student, losses, weights)
        self.student_adapter = models.adapter_for(p.student_config)
        if self.run.teacher.cache:
            self.teacher_side = CachedTeacher(self.run.teacher.cache, self.student_adapter)
        self.on_policy = None
        if options := on_policy_options(self.run):
            self.on_policy = on_policy.OnPolicy(
                options, seed, self.student_adapter, p.tokenizer, p.generation_config,
                synced=on_policy.synced_generation(p.student_ds), prompted=bool(self.run.data.prompt_field),
            )  # fmt: skip
        self.pruner = prune.Pruner(self.engine.module.student, self.run.prune) if self.run.prune else None
        if self.pruner is not None:
            self.engine.module.kept_heads = self.pruner.kept_heads
        set_seed(seed + dist.rank())  # dropout and masking; a resume restores the saved state
        self.device = self.engine.device
        self.collate = batches.make_collator(self.run.data, p.tokenizer, student)
        self.train_collate = self.collate
        if p.teacher_tokenizer is not None:  # the training rows hold the teacher's tokens too
            shifts = tuple(int(models.adapter_for(c).kind == "causal") for c in (p.student_config, p.teacher_config))
            teacher_collate = batches.make_collator(self.run.data, p.teacher_tokenizer, teacher.module, rows_vary=True)
            self.train_collate = alignment.AlignedCollator(self.collate, teacher_collate, shifts)
        self.batches = self._train_batches()
        self.checkpoints = p.output_dir / "checkpoints"
        self.step = 0
        self.micro_batches_done = 0
        if p.resumes:
            self._resume(resume_tag or checkpoint.latest_tag(self.checkpoints))
        self.log = RunLog(p.output_dir, self.step)

    def _train_batches(self) -> batches.TrainBatches:
        on_gpu = self.device.type != "cpu"
        workers = self.train_config.dataloader_num_workers
        grouped = self.train_config.group_by_length
        return batches.TrainBatches(
            self.p.datasets[self.run.data.train_split],
            self.train_collate,
            self.train_config.per_device_train_batch_size,
            self.train_config.seed,
            num_workers=(2 if on_gpu else 0) if workers is None else workers,
            pin_memory=on_gpu and self.train_config.dataloader_pin_memory,
            group_by_length=self.run.data.generates_from_sources() if grouped is None else grouped,
            teacher_rows=self.teacher_side.rows if isinstance(self.teacher_side, CachedTeacher) else None,
        )

    def _resume(self, tag: str) -> None:
        state = checkpoint.load(self.engine, self.checkpoints, tag)
        self.step, self.micro_batches_done = state["step"], state["micro_batches_done"]
        # The optimizer comes back with the learning rate the saved schedule set for this step; a resume that
        # runs longer (train.max_steps) has a schedule of its own, whose rate here the next step takes.
        schedule = self.engine.lr_scheduler
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ("lr_scheduler.step() before optimizer.step()": on purpose)
            schedule.last_epoch -= 1
            schedule.step()
        if self.pruner is not None:
            self.pruner.load_state_dict(checkpoint.extra_state(self.checkpoints, tag))
        dist.print_main(f"resumed from {self.checkpoints / tag} at step {self.step}")

    # -- one step -----------------------------------------------------------------------------------------
    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch on the device, with the target positions' flat indices computed on the host."""
        if batch.get("labels") is not None:
            index = target_index(self.student_adapter, batch["labels"])
            batch = {**batch, "target_index": index.pin_memory() if self.device.type != "cpu" else index}
            if "align_group" in batch:  # a logit chunk ends only between groups
                batch["chunk_breaks"] = cross_tokenizer.chunk_breaks(batch["align_group"].flatten()[index])
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def teacher_features(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        return self.teacher_side.features(batch) if self.teacher_side is not None else None

    def step_tokens(self, batches: list[dict[str, torch.Tensor]], sampled: list[bool] | None = None):
        """Token counts of the optimizer step's micro-batches on all ranks (`features.token_counts`), on the
        device; counted on the host, so no micro-step waits for the device. Also adds to the window's tokens.
        An on-policy micro-batch (`sampled`) counts only its targets, as "sampled": only the KD term reads it."""
        counts = defaultdict(int)
        for index, batch in enumerate(batches):
            for key, count in token_counts(self.student_adapter, batch).items():
                if key != "targets":
                    self.window.tokens += int(count)
                if sampled and sampled[index]:
                    key = "sampled" if key == "targets" else None
                if key is not None:
                    counts[key] += int(count)
        for batch in batches:  # positions computed, padding included: what grouping by length saves
            self.window.positions += batch["input_ids"].numel()
            if self.student_adapter.kind == "seq2seq" and batch.get("labels") is not None:
                self.window.positions += batch["labels"].numel()
        keys = sorted(counts)
        summed = dist.all_reduce_tensor(torch.tensor([float(counts[k]) for k in keys], device=self.device))
        return dict(zip(keys, summed.unbind()))

    def optimizer_step(self, batches: list[dict[str, torch.Tensor]]) -> None:
        """One optimizer step over its micro-batches (on the host): teacher forward, student forward and loss
        terms, backward; DeepSpeed updates the weights after the last one.

        Every term is a mean over all tokens of the step, on all ranks: each micro-batch contributes its sum over
        the step's count, and since DeepSpeed averages gradients over ranks, each rank's share is scaled by the
        world size (and not divided by the accumulation steps).
        """
        sampled = [self.on_policy is not None and self.on_policy.chooses(self.micro_batches_done + i)
                   for i in range(len(batches))]  # fmt: skip
        if any(sampled):  # on-policy micro-batches: the student's samples are their targets (on_policy.py)
            student = self.engine.module.student
            batches = [self.on_policy.sampled(student, b, self.device) if s else b for b, s in zip(batches, sampled)]
        step_tokens = self.step_tokens(batches, sampled)
        for index, batch in enumerate(batches):
            batch = self.to_device(batch)
            only = on_policy.TERMS if sampled[index] else None
            last = index == len(batches) - 1
            self.micro_step(batch, self.teacher_features(batch), step_tokens, last=last, only=only)

    def micro_step(self, batch, teacher_features, step_tokens, last: bool, only: tuple[str, ...] | None = None) -> None:
        """Student forward and loss terms (`only` these, if given) on one micro-batch (on the device), backward,
        engine step; `last`: the step's gradient is complete after it."""
        total, terms = self.engine(batch, teacher_features, step_tokens, only)
        if only is not None:  # logged apart: loss/on_policy_kd
            terms = {f"on_policy_{name}": value for name, value in terms.items()}
        self.engine.backward(total * dist.world_size(), scale_wrt_gas=False)
        if self.pruner is not None and last and self.pruner.scoring(self.step + 1):  # scored where masks tighten
            self.pruner.observe(self._local_sensitivities(), reduce=self._sum_over_ranks)
        self.engine.step()
        for name, value in {"loss": total.detach(), **terms}.items():
            self.window.sums[name] += value  # stays on the device until a logging step

    def _local_sensitivities(self):
        """(name, |w * grad| over this rank's part of the weight) for every student weight."""
        for name, parameter in self.engine.module.student.named_parameters():
            yield name, prune.local_sensitivity(parameter)

    def _sum_over_ranks(self, scores: dict) -> dict:
        """Per-unit score vectors summed over ranks, in one all-reduce of their concatenation."""
        keys = list(scores)
        flat = dist.all_reduce_tensor(torch.cat([scores[key].flatten() for key in keys]).to(self.device)).cpu()
        sizes = [scores[key].numel() for key in keys]
        return {key: part.view_as(scores[key]) for key, part in zip(keys, flat.split(sizes))}

    # -- the loop -----------------------------------------------------------------------------------------
    def train(self) -> Path:
        """Runs from the current step to the last, then exports the student; returns the export's path."""
        if dist.is_main():
            dist.print_main(run_summary(self.p, resumed_at=self.step))
        self.begin()
        self.train_steps(until=self.p.total_steps)
        self.progress.close()  # the finished bar, before what the export prints
        return self.export_student()

    def close(self) -> None:
        """Ends the run in order: progress bar and TensorBoard writer closed, collating workers stopped, the
        engines' hooks and buffers released (a rank that exits with live helper threads can abort)."""
        if hasattr(self, "progress"):
            self.progress.close()
        self.log.close()
        self.stream = None  # the DataLoader iterator: its workers exit with it
        self.engine.destroy()
        if self.teacher is not None and self.owns_teacher:
            self.teacher.destroy()

    def begin(self, desc: str = "distill", stream: bool = True) -> None:
        """Writes the run's files and opens the batch stream at the (possibly resumed) position; `desc` names the
        progress bar; `stream=False`: the caller feeds the batches (`Cohort`)."""
        write_run_files(self.p)
        self.memory_before_steps_gb = memory_in_use_gb()  # the models and their states are in place
        self.engine.train()
        self.stream = self.batches.iterate(self.micro_batches_done) if stream else None
        self.window = LogWindow()
        self.progress = tqdm(
            total=self.p.total_steps,
            initial=self.step,
            desc=desc,
            disable=not dist.is_main(),
            dynamic_ncols=True,
            mininterval=0.1 if sys.stderr.isatty() else 30.0,  # a log file gets a line every 30 s, not every step
        )

    def train_steps(self, until: int) -> None:
        """Optimizer steps up to step `until`, logging, evaluating and checkpointing on their schedules."""
        accumulation = self.train_config.gradient_accumulation_steps
        while self.step < until:
            self.engine.module.set_step(self.step)
            self.optimizer_step([next(self.stream) for _ in range(accumulation)])
            self.finish_step()

    def finish_step(self) -> None:
        """After an optimizer step: counters, pruning masks, and logging, evaluation and checkpoints when due."""
        self.step += 1
        if self.pruner is not None:
            self.pruner.update(self.step)
        self.window.steps += 1
        self.micro_batches_done += self.train_config.gradient_accumulation_steps
        self.progress.update(1)
        last = self.step == self.p.total_steps
        if last or self.step % self.train_config.logging_steps == 0:
            self._log_training()
        if last or (self.train_config.eval_steps and self.step % self.train_config.eval_steps == 0):
            self._evaluate()
        if last or (self.train_config.save_steps and self.step % self.train_config.save_steps == 0):
            self._save_checkpoint()

    def _log_training(self) -> None:
        window, self.window = self.window, LogWindow()
        names = sorted(window.sums)
        reduced = dist.all_reduce_sum(
            [window.sums[n] / window.steps for n in names] + [window.tokens, window.positions]
        )
        scalars = {("loss" if n == "loss" else f"loss/{n}"): v for n, v in zip(names, reduced)}
        scalars["lr"] = self.engine.get_lr()[0]
        tokens, positions = reduced[-2], reduced[-1]
        scalars["tokens_per_s"] = tokens / (time.perf_counter() - window.started)
        scalars["padding_fraction"] = 1 - tokens / max(positions, 1)
        scalars["peak_memory_gb"] = peak_memory_gb()
        scalars["memory_before_models_gb"] = self.memory_before_models_gb
        scalars["memory_before_steps_gb"] = self.memory_before_steps_gb
        self._write_scalars(scalars)
        self.progress.set_postfix(loss=f"{scalars['loss']:.4f}", tok_s=f"{scalars['tokens_per_s']:.0f}")

    def _write_scalars(self, scalars: dict[str, float]) -> None:
        self.log.write(self.step, scalars)

    def _evaluate(self) -> None:
        split = self.p.validation_split
        if not split:
            return
        student = self.engine.module.student
        objective = None
        if not models.adapter_for(student.config).has_lm_head(student.config):
            objective = lambda batch: self.engine(batch, self.teacher_features(batch))  # noqa: E731
        results = scoring.score(
            student,
            self.p.datasets[split],
            self.collate,
            self.p.tokenizer,
            self.run,
            synced_gpus=ds_config.zero_stage(self.p.student_ds) == 3,
            objective=objective,
            progress=sys.stderr.isatty(),  # under the training bar: on a terminal only, not into a log file
        )
        self.engine.train()
        self._write_scalars({f"eval/{k}": v for k, v in results.items()})
        dist.print_main(f"step {self.step}: {scoring.described(results, prefix='eval ')}")

    def _save_checkpoint(self) -> None:
        state = {"step": self.step, "micro_batches_done": self.micro_batches_done}
        extra = self.pruner.state_dict() if self.pruner is not None else None
        checkpoint.save(self.engine, self.checkpoints, self.step, state, self.train_config.save_total_limit, extra)

    def export_student(self) -> Path:
        """Writes the trained student to output_dir/model (rank 0), after every rank has gathered its weights."""
        state = export.gather_student_state(self.engine)
        target = self.p.output_dir / "model"
        if dist.is_main():
            template = self.checkpoints / export.TEMPLATE_DIR
            if self.pruner is not None:
                state = export.cut_pruned(state, template, self.pruner.state_dict())
            provenance = {"run": str(self.p.output_dir.resolve()), "step": self.step}
            export.save_hf_model(state, template, target, provenance)
            dist.print_main(f"exported the trained model to {target}")
        dist.barrier()
        return target


def train_student(run: RunConfig, resume: bool | str = False, overwrite: bool = False) -> Path:
    """Runs one distillation (or, without a teacher, plain training) and returns the exported student's path."""
    dist.init(run.train.ddp_timeout)
    trainer = Trainer(prepare(run, resume=resume, overwrite=overwrite))
    try:
        return trainer.train()
    finally:
        trainer.close()
