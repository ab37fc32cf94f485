"""One student's side of a run: its engine (student + loss terms), the samples it draws for on-policy KD, its
random-number state, and what it writes to its own output_dir (log, evaluations, checkpoints, export).

The loop (train/loop.py) drives one or several of these around one teacher; everything here concerns one student
and touches no other.
"""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ds_distill import dist, models
from ds_distill.config import deepspeed as ds_config
from ds_distill.data import batches
from ds_distill.data.tokenizers import load_tokenizer
from ds_distill.objectives.features import token_counts
from ds_distill.surgery import prune
from ds_distill.train import checkpoint, drafting, engines, export, on_policy, scoring
from ds_distill.train.prepare import Prepared, on_policy_options, write_run_files
from ds_distill.train.progress import LogWindow, RunLog, memory_in_use_gb, peak_memory_gb
from ds_distill.train.student import build_student


@dataclass
class StepBatches:
    """A student's micro-batches of one optimizer step (on the host) and their token counts on all ranks."""

    batches: list[dict[str, torch.Tensor]]
    sampled: list[bool]
    """Which micro-batches hold the student's own samples (on-policy KD) instead of the data's."""
    tokens: dict[str, torch.Tensor]
    """`features.token_counts` of the step's micro-batches summed over ranks: each term's denominator."""


class StudentRun:
    """A student being trained: its DeepSpeed engine and pruner, its step counters, and its output_dir."""

    def __init__(self, p: Prepared, teacher, name: str, resume_tag: str | None, own_rng: bool,
                 draft_targets: dict | None = None):  # fmt: skip
        """`teacher`: the run's teacher engine (a student cut from it reads its weights), or None; `name`: the
        student's name under `students:`, else ""; `resume_tag`: the checkpoint to go on from; `own_rng`: keep a
        random-number state of its own (one of several students: its dropout must not depend on the others')."""
        from transformers import set_seed

        self.p, self.name, self.train_config = p, name, p.run.train
        seed = self.train_config.seed
        student = build_student(p.run.student, p.student_config, p.student_ds, seed, engines.cut_student(p, teacher))
        student.generation_config = p.generation_config  # evaluation generates as the export will
        if self.train_config.gradient_checkpointing:
            # non-reentrant: gradients also flow into features captured inside a checkpointed block
            student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        losses, weights = engines.loss_terms(p)
        self.teacher_keys = set().union(*(loss.teacher_keys for loss in losses.values()))
        self.reads_teacher = any(loss.requires_teacher for loss in losses.values())  # CE alone does not
        self.engine = engines.student_engine(p, student, losses, weights)
        self.adapter = models.adapter_for(p.student_config)
        self.on_policy = None
        if options := on_policy_options(p.run):
            self.on_policy = on_policy.OnPolicy(
                options, seed, self.adapter, p.tokenizer, p.generation_config,
                synced=on_policy.synced_generation(p.student_ds), prompted=p.run.data.prompted(),
            )  # fmt: skip
        self.pruner = prune.Pruner(self.engine.module.student, p.run.prune) if p.run.prune else None
        if self.pruner is not None:
            self.engine.module.kept_heads = self.pruner.kept_heads
        set_seed(seed + dist.rank())  # dropout and masking; a resume restores the saved state
        self.device = self.engine.device
        self.collate = batches.make_collator(p.run.data, p.tokenizer, student)
        self.checkpoints = p.output_dir / "checkpoints"
        self.step = 0
        self.micro_batches_done = 0
        if resume_tag is not None:
            self._resume(resume_tag)
        self.rng = checkpoint.rng_state() if own_rng else None  # as it seeded (or resumed) it
        self.log = RunLog(p.output_dir, self.step)
        self.progress = None
        # train.eval_draft_for's models by (path, dtype), loaded at the first evaluation; shared by a run's students
        self.draft_targets = {} if draft_targets is None else draft_targets

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

    @contextlib.contextmanager
    def own_rng(self):
        """This student's random-number state while it works (a no-op for a run's only student)."""
        if self.rng is None:
            yield
            return
        checkpoint.set_rng_state(self.rng)
        try:
            yield
        finally:
            self.rng = checkpoint.rng_state()

    def begin(self, memory_before_models_gb: float) -> None:
        """Writes the run's files and opens the log window and progress bar at the (possibly resumed) step."""
        write_run_files(self.p)
        self.memory_gb = {"memory_before_models_gb": memory_before_models_gb,
                          "memory_before_steps_gb": memory_in_use_gb()}  # fmt: skip  # the models are in place
        self.engine.train()
        self.window = LogWindow()
        self.progress = tqdm(
            total=self.p.total_steps,
            initial=self.step,
            desc=self.name or "distill",
            disable=not dist.is_main(),
            dynamic_ncols=True,
            mininterval=0.1 if sys.stderr.isatty() else 30.0,  # a log file gets a line every 30 s, not every step
        )

    # -- its part of a step -----------------------------------------------------------------------------
    def step_batches(self, data: list[dict[str, torch.Tensor]]) -> StepBatches:
        """The step's micro-batches as this student trains on them: the data's, or, on the micro-batches that
        on-policy KD draws, the student's own samples (train/on_policy.py)."""
        self.engine.module.set_step(self.step)
        drawn = self.micro_batches_done
        sampled = [self.on_policy is not None and self.on_policy.chooses(drawn + i) for i in range(len(data))]
        student = self.engine.module.student
        own = [self.on_policy.sampled(student, b, self.device) if s else b for b, s in zip(data, sampled)]
        return StepBatches(own, sampled, self.step_tokens(own, sampled))

    def step_tokens(self, micro_batches: list[dict[str, torch.Tensor]], sampled: list[bool] | None = None):
        """Token counts of the optimizer step's micro-batches on all ranks (`features.token_counts`), on the
        device; counted on the host, so no micro-step waits for the device. Also adds to the window's tokens.
        An on-policy micro-batch (`sampled`) counts only its targets, as "sampled": only the KD term reads it."""
        counts = defaultdict(int)
        for index, batch in enumerate(micro_batches):
            for key, count in token_counts(self.adapter, batch).items():
                if key != "targets":
                    self.window.tokens += int(count)
                if sampled and sampled[index]:
                    key = "sampled" if key == "targets" else None
                if key is not None:
                    counts[key] += int(count)
        for batch in micro_batches:  # positions computed, padding included: what grouping by length saves
            self.window.positions += batch["input_ids"].numel()
            if self.adapter.kind == "seq2seq" and batch.get("labels") is not None:
                self.window.positions += batch["labels"].numel()
        keys = sorted(counts)
        summed = dist.all_reduce_tensor(torch.tensor([float(counts[k]) for k in keys], device=self.device))
        return dict(zip(keys, summed.unbind()))

    def observe_pruning(self) -> None:
        """HomoDistil: after the backward of a step's last micro-batch, the weights' sensitivities where the
        masks tighten next."""
        if self.pruner is not None and self.pruner.scoring(self.step + 1):
            self.pruner.observe(self._local_sensitivities(), reduce=self._sum_over_ranks)

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

    def add_to_window(self, total: torch.Tensor, terms: dict[str, torch.Tensor], sampled: bool) -> None:
        """A micro-step's loss and terms, summed on the device until a logging step; the terms of an on-policy
        micro-batch are logged apart (loss/on_policy_kd)."""
        if sampled:
            terms = {f"on_policy_{name}": value for name, value in terms.items()}
        for name, value in {"loss": total.detach(), **terms}.items():
            self.window.sums[name] += value

    def finish_step(self, teacher_features) -> None:
        """After an optimizer step: counters, pruning masks, and logging, evaluation and checkpoints when due.
        `teacher_features`: batch -> the teacher's features (a bare encoder is evaluated on its terms)."""
        self.step += 1
        if self.pruner is not None:
            self.pruner.update(self.step)
        self.window.steps += 1
        self.micro_batches_done += self.train_config.gradient_accumulation_steps
        self.progress.update(1)
        last, train = self.step == self.p.total_steps, self.train_config
        if last or self.step % train.logging_steps == 0:
            self._log_training()
        if last or (train.eval_steps and self.step % train.eval_steps == 0):
            self.evaluate(teacher_features)
        if last or (train.save_steps and self.step % train.save_steps == 0):
            self.save_checkpoint()

    # -- what it writes ---------------------------------------------------------------------------------
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
        self.log.write(self.step, {**scalars, **self.memory_gb})
        self.progress.set_postfix(loss=f"{scalars['loss']:.4f}", tok_s=f"{scalars['tokens_per_s']:.0f}")

    def evaluate(self, teacher_features) -> None:
        split = self.p.validation_split
        if not split:
            return
        student = self.engine.module.student
        objective = None
        if not self.adapter.has_lm_head(student.config):
            objective = lambda batch: self.engine(batch, teacher_features(batch))  # noqa: E731
        results = scoring.score(
            student,
            self.p.datasets[split],
            self.collate,
            self.p.tokenizer,
            self.p.run,
            synced_gpus=ds_config.zero_stage(self.p.student_ds) == 3,
            objective=objective,
            progress=sys.stderr.isatty(),  # under the training bar: on a terminal only, not into a log file
        )
        if self.train_config.eval_draft_for:
            results.update(self._draft_scores(student, self.p.datasets[split]))
        self.engine.train()
        self.log.write(self.step, {f"eval/{k}": v for k, v in results.items()})
        where = f"{self.name} " if self.name else ""
        dist.print_main(f"{where}step {self.step}: {scoring.described(results, prefix='eval ')}")

    def _draft_scores(self, student, split) -> dict[str, float]:
        """The student as `train.eval_draft_for`'s draft (train/drafting.py), measured by the main rank; the target
        loads at the first evaluation and stays, one copy for every student of the run that drafts for it."""
        results = {}
        if dist.is_main():
            key = (self.train_config.eval_draft_for, next(student.parameters()).dtype)
            if key not in self.draft_targets:
                self.draft_targets[key] = self._load_draft_target(key[1])
            target, target_tokenizer = self.draft_targets[key]
            prompts = drafting.draft_prompts(split, self.p.run.data, self.adapter.kind, drafting.PROMPTS)
            prompts = drafting.in_target_tokens(prompts, self.p.tokenizer, target_tokenizer)
            results = drafting.draft_scores(target, student, prompts, self.train_config.generation_max_length,
                                            target_tokenizer.pad_token_id, False, (target_tokenizer, self.p.tokenizer))  # fmt: skip
        dist.barrier()
        return results

    def _load_draft_target(self, dtype) -> tuple:
        target = self.train_config.eval_draft_for
        adapter = models.adapter_for(models.load_config(target, "train.eval_draft_for"))
        model = adapter.from_pretrained(target, "teacher", dtype=dtype).to(self.device).eval()
        return model, load_tokenizer(target)

    def save_checkpoint(self) -> None:
        state = {"step": self.step, "micro_batches_done": self.micro_batches_done}
        extra = self.pruner.state_dict() if self.pruner is not None else None
        checkpoint.save(self.engine, self.checkpoints, self.step, state, self.train_config.save_total_limit, extra)

    def export(self) -> Path:
        """Writes the trained student to output_dir/model (rank 0), after every rank has gathered its weights."""
        if self.progress is not None:
            self.progress.close()  # the finished bar, before what the export prints
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

    def close(self) -> None:
        """Progress bar and TensorBoard writer closed; the engine's hooks and buffers released (a rank that exits
        with live helper threads can abort)."""
        if self.progress is not None:
            self.progress.close()
        self.log.close()
        self.engine.destroy()
