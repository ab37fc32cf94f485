"""What ds_distill may write and delete: run directories and exported model directories, each marked as ours.

A run's `output_dir` carries `RUN_MARKER` from the moment the run claims it; an exported Hugging Face directory
carries `EXPORT_MARKER` (with where it came from). Only a directory with the right marker is ever replaced,
never the working directory, the home directory, a parent of either or the filesystem root, and nothing is
deleted before every check of the run has passed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from ds_distill import dist
from ds_distill.config import paths
from ds_distill.config.losses import losses_tree, parse_losses
from ds_distill.errors import ConfigError

RESUMABLE = (
    "train.output_dir", "train.max_steps", "train.num_train_epochs",
    "train.eval_steps", "train.save_steps", "train.logging_steps", "train.save_total_limit", "train.eval_metric",
    "train.per_device_eval_batch_size", "train.generation_max_length", "train.num_beams", "data.max_eval_samples",
    "train.ddp_timeout", "train.dataloader_num_workers", "train.dataloader_pin_memory",
    "data.preprocessing_num_workers", "data.tokenized_path",
    "train.gradient_checkpointing", "train.torch_compile", "teacher.deepspeed_config",
)  # fmt: skip
"""What `--resume` may change: where the run lies (a run directory moved), how long it goes on (its learning-rate
schedule then spans the new length from the step it resumes at), when and how it evaluates, saves and logs, and
how the same computation runs (data workers, recomputed activations, compilation, where the frozen teacher
lives). Anything else would make the resumed run another."""
RUN_MARKER = "ds_distill_run.json"
EXPORT_MARKER = "ds_distill_export.json"
STUDENT_MARKER = "ds_distill_student.json"  # a student cut from a teacher (`ds-distill make_student`)


def _protected(path: Path) -> str | None:
    """Why `path` must never be deleted whatever it holds, or None."""
    path = path.resolve()
    for name, place in (("the working directory", Path.cwd().resolve()), ("your home directory", Path.home())):
        if path == place or path in place.parents:
            return f"it is {name}" if path == place else f"it holds {name}"
    return None


def is_empty(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def check_replaceable(path: Path, marker: str, what: str, flag: str) -> None:
    """Refuses to replace `path` unless it is empty or carries `marker`; `what` and `flag` word the error."""
    refuse_protected(path, flag)
    if not is_empty(path) and not (path / marker).is_file():
        raise ConfigError(
            f"{path} is not empty and is not {what} (no {marker} inside); choose another {flag} or empty it yourself"
        )


def refuse_home(path: Path, flag: str) -> None:
    """Refuses the home directory or a parent of it (the filesystem root) as a directory to write a run into."""
    if path.resolve() == Path.home() or path.resolve() in Path.home().parents:
        raise ConfigError(f"{path} cannot be replaced: it is your home directory or holds it; choose another {flag}")


def refuse_protected(path: Path, flag: str) -> None:
    """Refuses the working or home directory, a parent of either, or the root as a place we write to."""
    reason = _protected(path)
    if reason:
        raise ConfigError(f"{path} cannot be replaced: {reason}; choose another {flag}")


def check_target(path: Path, marker: str, what: str, overwrite: bool) -> None:
    """May new output (an export, a student) replace `path`? Yes if it is empty or `what` (carries `marker`);
    with `overwrite`, any directory but a run or a protected one."""
    if not overwrite:
        check_replaceable(path, marker, what, "--output_dir (or pass --overwrite)")
        return
    refuse_protected(path, "--output_dir")
    if (path / RUN_MARKER).is_file():
        raise ConfigError(
            f"{path} holds a ds_distill run, which --overwrite never replaces; choose another --output_dir"
        )


def check_export_target(path: Path, overwrite: bool, source: Path) -> None:
    """An export may replace an earlier export; with `overwrite`, any directory but a run, its checkpoints
    (`source`) or a protected one."""
    source = source.resolve()
    if path.resolve() == source or path.resolve() in source.parents:
        raise ConfigError(f"--output_dir {path} holds the checkpoints being exported; choose another directory")
    check_target(path, EXPORT_MARKER, "an earlier export", overwrite)


def claim(output_dir: Path, config_yaml: str, resume: bool | str, overwrite: bool, has_checkpoint: bool) -> bool:
    """Checks `output_dir` against this run, marks it ours; returns whether a checkpoint exists to resume from.

    A directory holding another run is refused unless --resume (continue it; of its settings only those in
    RESUMABLE may change) or --overwrite (replace it: only a directory marked as a ds_distill run).
    `resume="auto"` continues the same run (same config) from its checkpoint when it has one and starts it
    otherwise, so that the same command run again, or a requeued job, goes on where it stopped.
    """
    if overwrite and resume:
        raise ConfigError("give --resume or --overwrite, not both")
    export = output_dir / "model"
    if not (overwrite or is_empty(export) or (export / EXPORT_MARKER).is_file()):
        raise ConfigError(f"{export} holds files that are not an export of this run; move them away first")
    saved = output_dir / "config.yaml"
    if overwrite:
        check_replaceable(output_dir, RUN_MARKER, "a ds_distill run", "train.output_dir")
        dist.barrier()
        if dist.is_main() and output_dir.exists():
            shutil.rmtree(output_dir)
        resume = False
    elif resume == "auto":
        if (saved.is_file() or has_checkpoint) and not (saved.is_file() and not changed_keys(saved, config_yaml)):
            differ = f" ({_described(changed_keys(saved, config_yaml))})" if saved.is_file() else ""
            raise ConfigError(
                f"{output_dir} holds a run with a different config{differ}, which --resume=auto does not continue; "
                "pass --resume to continue it or --overwrite to replace it"
            )
        resume = has_checkpoint
    elif resume:
        if not has_checkpoint:
            raise ConfigError(
                f"--resume: no complete checkpoint in {output_dir / 'checkpoints'}; start without --resume"
            )
        refused = [(key, *values) for key, *values in changed_keys(saved, config_yaml) if key not in RESUMABLE]
        if saved.is_file() and refused:
            raise ConfigError(
                f"--resume continues the run in {output_dir} as it started, and these settings differ from its "
                f"config.yaml: {_described(refused)}; only how long it runs and when it evaluates, saves and logs "
                "may change (run_dir.RESUMABLE). Pass --overwrite to start it again with them"
            )
    elif saved.is_file() or has_checkpoint:
        same = saved.is_file() and saved.read_text() == config_yaml
        what = "this run's checkpoints" if same else "a run with a different config"
        raise ConfigError(
            f"{output_dir} already holds {what}; pass --resume to continue it or --overwrite to replace it"
        )
    elif not is_empty(output_dir) and not (output_dir / RUN_MARKER).is_file():
        raise ConfigError(f"{output_dir} holds files that are not a ds_distill run; choose another train.output_dir")
    dist.barrier()
    if dist.is_main():
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / RUN_MARKER).write_text(json.dumps({"config": "config.yaml"}) + "\n")
    dist.barrier()
    return resume


def changed_keys(saved: Path, config_yaml: str) -> list[tuple[str, object, object]]:
    """(dotted key, the saved run's value, this one's) for each setting that differs from `saved` (config.yaml)."""
    if not saved.is_file():
        return []
    before, after = (yaml.safe_load(text) or {} for text in (saved.read_text(), config_yaml))
    if not (isinstance(before, dict) and isinstance(after, dict)):
        return [("config.yaml", before, after)] if before != after else []
    before, after = _flat(paths.absolute_tree(_spelled_out(before))), _flat(after)  # saved with relative paths too
    return [(key, before.get(key), after.get(key)) for key in sorted(before.keys() | after.keys())
            if before.get(key) != after.get(key)]  # fmt: skip


def _spelled_out(tree: dict) -> dict:
    """A saved config with every option of its loss terms spelled out, as this version writes them: a run saved
    by an earlier version wrote only the options it set, and one that adds an option writes it at its default."""
    try:
        return {**tree, "losses": losses_tree(parse_losses(tree["losses"]))} if tree.get("losses") else tree
    except ConfigError:  # a term or option this version lacks: compared as written, so it shows as changed
        return tree


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _described(changes) -> str:
    return ", ".join(f"{key} {before!r} -> {after!r}" for key, before, after in changes)


def replace_directory(staging: Path, target: Path) -> None:
    """Moves a finished `staging` directory to `target`, replacing what `check_replaceable` allowed there."""
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
