"""The distillation run, top to bottom: prepare -> load both engines -> train -> export.

    ds-distill distill --config=RUN.yaml [--train.max_steps=10] [--resume | --overwrite]
    deepspeed --num_gpus 2 --module ds_distill distill --config=RUN.yaml

One optimizer step = `gradient_accumulation_steps` micro-batches, each: teacher forward under no_grad ->
student engine forward (student features + every loss term) -> backward -> step (DeepSpeed applies the
update on the accumulation boundary). Everything that can be checked without weights is checked first.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ds_distill import dist, models
from ds_distill.config import deepspeed as ds_config
from ds_distill.config.run import RunConfig, to_yaml
from ds_distill.data import batches
from ds_distill.data import tokenized as data
from ds_distill.errors import ConfigError
from ds_distill.evaluation import evaluate
from ds_distill.objectives.capture import FeatureCapture
from ds_distill.objectives.layerwise import LayerwiseLoss, ModelPair
from ds_distill.objectives.registry import build_losses
from ds_distill.surgery import prune, students
from ds_distill.surgery.importance import activation_scores
from ds_distill.train import checkpoint, export, run_dir
from ds_distill.train.student import (
    DistillationModule,
    build_student,
    forward_features,
    student_hf_config,
    token_counts,
)
from ds_distill.train.teacher import load_teacher


@dataclass
class Prepared:
    """Everything known before weights load."""

    run: RunConfig
    output_dir: Path
    resume: bool
    tokenizer: Any
    datasets: Any
    teacher_ds: dict | None
    student_ds: dict
    student_config: Any
    generation_config: Any
    total_steps: int
    validation_split: str | None


def prepare(run: RunConfig, resume: bool = False, overwrite: bool = False) -> Prepared:
    """Validates config, DeepSpeed JSON, the models' configs, tokenizer and data, then claims output_dir.

    Nothing in output_dir is touched (not even by --overwrite) until every check has passed.
    """
    train = run.train
    teacher_json = ds_config.load_json(run.teacher.deepspeed_config) if run.teacher.model_name_or_path else None
    student_json = ds_config.load_json(run.student.deepspeed_config)
    if teacher_json is not None and "optimizer" in teacher_json:
        raise ConfigError(f"{run.teacher.deepspeed_config}: the teacher is frozen; remove its optimizer section")
    teacher_config, student_config = _check_models(run)
    tokenizer = _check_tokenizer(run, teacher_config, student_config)

    tokenized = data.load_tokenized(run.data, tokenizer)
    validation_split = run.data.validation_split if run.data.validation_split in tokenized else None
    if run.data.validation_split and not validation_split:
        dist.print_main(
            f"dataset '{run.data.dataset}' has no split '{run.data.validation_split}': training without evaluation "
            "(data.validation_split_percentage holds out a share of the training split)"
        )
    batches_per_epoch = batches.batches_per_epoch(
        len(tokenized[run.data.train_split]), train.per_device_train_batch_size
    )
    total_steps = train.max_steps
    if total_steps <= 0:
        total_steps = math.ceil(train.num_train_epochs * batches_per_epoch / train.gradient_accumulation_steps)

    from deepspeed.accelerator import get_accelerator

    on_cpu = get_accelerator().device_name() == "cpu"
    world = dist.world_size()
    student_ds = ds_config.fill_auto(student_json, train, world, total_steps, on_cpu, run.student.deepspeed_config)
    teacher_ds = None
    if teacher_json is not None:
        teacher_ds = ds_config.fill_auto(teacher_json, train, world, total_steps, on_cpu, run.teacher.deepspeed_config)
    if run.prune is not None:
        dims = run.student.init.from_teacher
        sliced = dims is not None and dims.strategy == "sliced" and not dims.source
        prune.check(run.prune, student_ds, teacher_config, student_config, starts_from_teacher=sliced)
    output_dir = Path(train.output_dir)
    # rank 0's view decides for all (on node-local disks the others may see none; resuming then says so)
    has_checkpoint = dist.all_gather_objects(checkpoint.latest_tag(output_dir / "checkpoints") is not None)[0]
    resume = run_dir.claim(output_dir, to_yaml(run), resume, overwrite, has_checkpoint)
    source = run.teacher.weights() or run.student.model_name_or_path
    generation_config = export.generation_config(source, student_config, len(tokenizer))
    return Prepared(
        run, output_dir, resume, tokenizer, tokenized, teacher_ds, student_ds, student_config, generation_config,
        total_steps, validation_split,
    )  # fmt: skip


def _check_models(run: RunConfig):
    """Both models' configs (no weights), checked against the task, the losses and the metric."""
    teacher_config = None
    if run.teacher.model_name_or_path:
        teacher_config = models.load_config(run.teacher.weights(), "teacher")
    student_config = student_hf_config(run.student, teacher_config)
    adapter = models.adapter_for(student_config)
    if run.data.task not in adapter.tasks:
        raise ConfigError(
            f"data.task '{run.data.task}' does not fit a {adapter.kind} student; use {' or '.join(adapter.tasks)}"
        )
    if run.train.eval_metric in ("bleu", "rouge") and adapter.kind != "seq2seq":
        raise ConfigError(f"train.eval_metric '{run.train.eval_metric}' needs a seq2seq model; use loss or accuracy")
    losses, _ = build_losses(run.losses, model_pair(run, student_config, teacher_config))
    if any("logits" in loss.needs for loss in losses.values()):
        for role, config in (("teacher", teacher_config), ("student", student_config)):
            if config is not None and not models.adapter_for(config).has_lm_head(config):
                raise ConfigError(f"the {role} has no LM head (a bare encoder): logit losses (ce, kd) do not apply")
        if run.data.task == "masked_lm" and run.data.mlm_probability == 0:
            raise ConfigError("data.mlm_probability is 0, so no token is a target for ce or kd; set it above 0")
    return teacher_config, student_config


def model_pair(run: RunConfig, student_config, teacher_config) -> ModelPair | None:
    return ModelPair(student_config, teacher_config, run.layer_map) if teacher_config is not None else None


def _check_tokenizer(run: RunConfig, teacher_config, student_config):
    """The one tokenizer both models must share."""
    tokenizer = data.load_tokenizer(data.tokenizer_source(run))
    if teacher_config is not None and run.student.model_name_or_path:
        data.check_same_tokenizer(run.teacher.weights(), run.student.model_name_or_path)
    for role, config in (("teacher", teacher_config), ("student", student_config)):
        if config is not None and config.vocab_size < len(tokenizer):
            raise ConfigError(
                f"the {role}'s vocabulary ({config.vocab_size}) is smaller than the tokenizer's ({len(tokenizer)}); "
                "they do not belong together: set data.tokenizer to the model's own tokenizer"
            )
    return tokenizer


def _write_run_files(p: Prepared) -> None:
    if not dist.is_main():
        return
    p.output_dir.mkdir(parents=True, exist_ok=True)
    (p.output_dir / "config.yaml").write_text(to_yaml(p.run))
    (p.output_dir / "ds_config_student.json").write_text(json.dumps(p.student_ds, indent=2))
    if p.teacher_ds is not None:
        (p.output_dir / "ds_config_teacher.json").write_text(json.dumps(p.teacher_ds, indent=2))
    pruned = prune.target_config(p.student_config, p.run.prune) if p.run.prune else None
    export.save_template(
        p.output_dir / "checkpoints" / export.TEMPLATE_DIR,
        pruned or p.student_config,
        p.tokenizer,
        p.generation_config,
        pruned_from=p.student_config if pruned else None,
    )


def _peak_memory_gb(reset: bool = False) -> float:
    """Peak accelerator memory (`reset`: from now on); on the CPU accelerator, the process's peak resident host
    memory, which cannot be reset."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        if reset:
            get_accelerator().reset_peak_memory_stats()
        return get_accelerator().max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def _memory_in_use_gb() -> float:
    """Accelerator memory allocated now; on the CPU accelerator, the process's resident host memory now."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return get_accelerator().memory_allocated() / 2**30
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


@dataclass
class LogWindow:
    """Loss sums (device tensors: read once per logging step, not per micro-step) and token counts since the
    last logged step."""

    sums: dict[str, Any] = field(default_factory=lambda: defaultdict(float))
    steps: int = 0
    tokens: int = 0
    positions: int = 0
    started: float = field(default_factory=time.perf_counter)


class Trainer:
    """Owns both engines and the loop; `train()` runs from the current step to the last and exports."""

    def __init__(self, p: Prepared, teacher=None):
        """`teacher`: an already loaded teacher engine to reuse (a benchmark comparing objectives on one
        teacher); by default the run's teacher is loaded here."""
        import deepspeed
        from transformers import set_seed

        self.p, self.run, self.train_config = p, p.run, p.run.train
        # what the models and the step add to this is what `ds-distill plan` predicts
        self.memory_before_models_gb = _peak_memory_gb(reset=True)
        self.owns_teacher = teacher is None
        if teacher is None and p.teacher_ds:
            teacher = load_teacher(self.run.teacher.weights(), p.teacher_ds)
        self.teacher = teacher
        student = build_student(
            self.run.student, p.student_config, p.student_ds, self.train_config.seed, self._sliced_student()
        )
        student.generation_config = p.generation_config  # evaluation generates as the export will
        if self.train_config.gradient_checkpointing:
            # non-reentrant: gradients also flow into features captured inside a checkpointed block
            student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        teacher_config = self.teacher.module.config if self.teacher else None
        pair = model_pair(self.run, p.student_config, teacher_config)
        losses, weights = build_losses(self.run.losses, pair, vocab_size=len(p.tokenizer))
        self.student_adapter = models.adapter_for(p.student_config)
        self.teacher_capture = None
        if self.teacher is not None:
            self.teacher_adapter = models.adapter_for(teacher_config)
            keys = set().union(*(loss.teacher_keys for loss in losses.values()))
            self.teacher_capture = FeatureCapture(self.teacher.module, self.teacher_adapter, keys)
            self.teacher_forward = self.teacher
            if self.train_config.torch_compile:
                # graphs compiled earlier in this process (a reused teacher) would ignore the hooks added above
                torch.compiler.reset()
                if ds_config.zero_stage(p.teacher_ds) < 3:
                    self.teacher_forward = torch.compile(self.teacher.module)
                else:
                    dist.print_main(
                        "train.torch_compile: the ZeRO-3 teacher runs eagerly (weights gathered per module)"
                    )
        for name, loss in losses.items():
            if isinstance(loss, LayerwiseLoss):
                dist.print_main(f"losses.{name} layer pairs (student->teacher): {', '.join(map(str, loss.pairs))}")
                for note in loss.notes:
                    dist.print_main(f"losses.{name}: {note}")
        compile_student = self.train_config.torch_compile and ds_config.zero_stage(p.student_ds) < 3
        if self.train_config.torch_compile and not compile_student:
            dist.print_main("train.torch_compile: the ZeRO-3 student runs eagerly (weights gathered per module)")
        module = DistillationModule(student, losses, weights, compile=compile_student)
        self.engine, *_ = deepspeed.initialize(
            model=module,
            model_parameters=[q for q in module.parameters() if q.requires_grad],
            config=p.student_ds,
            lr_scheduler=self._lr_schedule,
        )
        self.pruner = prune.Pruner(self.engine.module.student, self.run.prune) if self.run.prune else None
        if self.pruner is not None:
            self.engine.module.kept_heads = self.pruner.kept_heads
        set_seed(self.train_config.seed + dist.rank())  # dropout and masking; a resume restores the saved state
        self.device = self.engine.device
        self.collate = batches.make_collator(self.run.data, p.tokenizer, student)
        on_gpu = self.device.type != "cpu"
        workers = self.train_config.dataloader_num_workers
        self.batches = batches.TrainBatches(
            p.datasets[self.run.data.train_split],
            self.collate,
            self.train_config.per_device_train_batch_size,
            self.train_config.seed,
            num_workers=(2 if on_gpu else 0) if workers is None else workers,
            pin_memory=on_gpu and self.train_config.dataloader_pin_memory,
            group_by_length=self._group_by_length(),
        )
        self.checkpoints = p.output_dir / "checkpoints"
        self.step = 0
        self.micro_batches_done = 0
        if p.resume:
            self._resume()
        self.writer = None
        if dist.is_main():
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a crashed run wrote after the checkpoint we resume from
            self.writer = SummaryWriter(str(p.output_dir / "tensorboard"), purge_step=self.step + 1)
            self._truncate_log()

    def _sliced_student(self) -> Path | None:
        """With `from_teacher.strategy: sliced`, the student cut from the teacher into output_dir/student_init
        (by rank 0, at the start of a run; a resumed run takes its weights from the checkpoint)."""
        dims = self.run.student.init.from_teacher
        if dims is None or dims.strategy != "sliced":
            return None
        path = self.p.output_dir / "student_init"
        if self.p.resume:  # the checkpoint holds the weights; the directory only gives the architecture
            return path if path.is_dir() else None
        split = self.p.datasets[self.run.data.train_split]
        rows = students.calibration_rows(
            len(split), self.train_config.per_device_train_batch_size, dims.calibration_batches, self.train_config.seed
        )

        def calibration(model):
            collate = batches.make_collator(self.run.data, self.p.tokenizer, model)
            return [collate([split[i] for i in batch]) for batch in rows]

        scores = None
        if dims.width == "importance" and not dims.source:
            # ranked on the teacher engine already loaded: each rank its share of the batches, sums added up
            share = students.rank_share(rows, dist.rank(), dist.world_size())
            collate = batches.make_collator(self.run.data, self.p.tokenizer, self.teacher.module)
            sums = activation_scores(self.teacher.module, (collate([split[i] for i in batch]) for batch in share))
            from deepspeed.accelerator import get_accelerator

            device = get_accelerator().current_device_name()
            scores = {
                key: dist.all_reduce_tensor(value.to(device)).cpu() for key, value in sorted(sums.items(), key=repr)
            }
        if dist.is_main():
            source = dims.source or self.run.teacher.weights()
            _, plan = students.make_student(source, path, dims, calibration, scores)
            dist.print_main(f"student cut from {source} ({dims.width} width) into {path}:\n{plan.summary()}")
        dist.barrier()
        return path

    def _group_by_length(self) -> bool:
        grouped = self.train_config.group_by_length
        return self.run.data.task in ("translation", "seq2seq") if grouped is None else grouped

    def _lr_schedule(self, optimizer):
        """Hugging Face's schedules: DeepSpeed's own start every run at their minimum rate and warm up over at
        least 2 steps, so `warmup_steps: 0` could not mean what it means in transformers."""
        from transformers import get_scheduler

        return get_scheduler(
            self.train_config.lr_scheduler_type,
            optimizer,
            num_warmup_steps=self.train_config.warmup_steps,
            num_training_steps=self.p.total_steps,
        )

    # -- resumption ---------------------------------------------------------------------------------------
    def _resume(self) -> None:
        tag = checkpoint.latest_tag(self.checkpoints)
        state = checkpoint.load(self.engine, self.checkpoints, tag)
        self.step, self.micro_batches_done = state["step"], state["micro_batches_done"]
        if self.pruner is not None:
            self.pruner.load_state_dict(checkpoint.extra_state(self.checkpoints, tag))
        dist.print_main(f"resumed from {self.checkpoints / tag} at step {self.step}")

    def _truncate_log(self) -> None:
        log = self.p.output_dir / "log.jsonl"
        if log.is_file():
            kept = [line for line in log.read_text().splitlines() if json.loads(line)["step"] <= self.step]
            log.write_text("".join(line + "\n" for line in kept))

    # -- one step -----------------------------------------------------------------------------------------
    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def teacher_features(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        if self.teacher is None:
            return None
        with torch.no_grad():
            return forward_features(self.teacher_forward, self.teacher_adapter, batch, self.teacher_capture)

    def step_tokens(self, batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Token counts of the optimizer step's micro-batches on all ranks (`student.token_counts`), on the
        device; counted on the host, so no micro-step waits for the device. Also adds to the window's tokens."""
        counts = defaultdict(int)
        for batch in batches:
            for key, count in token_counts(self.student_adapter, batch).items():
                counts[key] += int(count)
        self.window.tokens += sum(count for key, count in counts.items() if key != "targets")
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
        step_tokens, world = self.step_tokens(batches), dist.world_size()
        for index, batch in enumerate(batches):
            batch = self._to_device(batch)
            total, terms = self.engine(batch, self.teacher_features(batch), step_tokens)
            self.engine.backward(total * world, scale_wrt_gas=False)
            last = index == len(batches) - 1  # the step's gradient is complete; scored only where masks tighten
            if self.pruner is not None and last and self.pruner.scoring(self.step + 1):
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
        self.begin()
        self.train_steps(until=self.p.total_steps)
        return self._export()

    def close(self) -> None:
        """Ends the run in order: progress bar and TensorBoard writer closed, collating workers stopped, the
        engines' hooks and buffers released (a rank that exits with live helper threads can abort)."""
        if hasattr(self, "progress"):
            self.progress.close()
        if self.writer is not None:
            self.writer.close()
        self.stream = None  # the DataLoader iterator: its workers exit with it
        self.engine.destroy()
        if self.teacher is not None and self.owns_teacher:
            self.teacher.destroy()

    def begin(self) -> None:
        """Writes the run's files and opens the batch stream at the (possibly resumed) position."""
        _write_run_files(self.p)
        self.memory_before_steps_gb = _memory_in_use_gb()  # the models and their states are in place
        self.engine.train()
        self.stream = self.batches.iterate(self.micro_batches_done)
        self.window = LogWindow()
        self.progress = tqdm(
            total=self.p.total_steps,
            initial=self.step,
            desc="distill",
            disable=not dist.is_main(),
            dynamic_ncols=True,
            mininterval=0.1 if sys.stderr.isatty() else 30.0,  # a log file gets a line every 30 s, not every step
        )

    def train_steps(self, until: int) -> None:
        """Optimizer steps up to step `until`, logging, evaluating and checkpointing on their schedules."""
        accumulation, last_step = self.train_config.gradient_accumulation_steps, self.p.total_steps
        while self.step < until:
            self.engine.module.set_step(self.step)
            self.optimizer_step([next(self.stream) for _ in range(accumulation)])
            self.step += 1
            if self.pruner is not None:
                self.pruner.update(self.step)
            self.window.steps += 1
            self.micro_batches_done += accumulation
            self.progress.update(1)
            last = self.step == last_step
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
        scalars["peak_memory_gb"] = _peak_memory_gb()
        scalars["memory_before_models_gb"] = self.memory_before_models_gb
        scalars["memory_before_steps_gb"] = self.memory_before_steps_gb
        self._write_scalars(scalars)
        self.progress.set_postfix(loss=f"{scalars['loss']:.4f}", tok_s=f"{scalars['tokens_per_s']:.0f}")

    def _write_scalars(self, scalars: dict[str, float]) -> None:
        if not dist.is_main():
            return
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, self.step)
        self.writer.flush()
        with open(self.p.output_dir / "log.jsonl", "a") as log:
            log.write(json.dumps({"step": self.step, **scalars}) + "\n")

    def _evaluate(self) -> None:
        split = self.p.validation_split
        if not split:
            return
        student = self.engine.module.student
        objective = None
        if not models.adapter_for(student.config).has_lm_head(student.config):
            objective = lambda batch: self.engine(batch, self.teacher_features(batch))  # noqa: E731
        results = evaluate(
            student,
            self.p.datasets[split],
            self.collate,
            self.p.tokenizer,
            self.run,
            synced_gpus=ds_config.zero_stage(self.p.student_ds) == 3,
            objective=objective,
        )
        self.engine.train()
        self._write_scalars({f"eval/{k}": v for k, v in results.items()})
        dist.print_main(f"step {self.step}: " + ", ".join(f"eval {k} {v:.4f}" for k, v in results.items()))

    def _save_checkpoint(self) -> None:
        state = {"step": self.step, "micro_batches_done": self.micro_batches_done}
        extra = self.pruner.state_dict() if self.pruner is not None else None
        checkpoint.save(self.engine, self.checkpoints, self.step, state, self.train_config.save_total_limit, extra)

    def _export(self) -> Path:
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


def distill(run: RunConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Runs one distillation (or, without a teacher, plain training) and returns the exported student's path."""
    dist.init(run.train.ddp_timeout)
    trainer = Trainer(prepare(run, resume=resume, overwrite=overwrite))
    try:
        return trainer.train()
    finally:
        trainer.close()
