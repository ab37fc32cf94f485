"""`ds-distill chain`: teacher -> assistant(s) -> student, one full distillation per stage, resumable.

    ds-distill chain --config=CHAIN.yaml                      # or --recipe=flan_t5_3b_chain
    deepspeed --num_gpus 8 --module ds_distill chain --config=CHAIN.yaml
    ds-distill chain --config=CHAIN.yaml --overwrite=l6       # redo a finished stage whose config changed

A chain YAML:

    output_dir: runs/chain
    defaults:                # a run config every stage starts from (any key; `base: RECIPE_OR_YAML` too)
      teacher: {model_name_or_path: google/flan-t5-xl, deepspeed_config: ds_configs/teacher_replicated_bf16.json}
      data: {...}
      train: {max_steps: 20000, ...}
    stages:
      - name: l12            # the first stage's teacher is the defaults' teacher
        student: {init: {from_teacher: {encoder_layers: 12, decoder_layers: 12, strategy: sliced}}}
      - name: l6             # teacher: the previous stage's export (teacher_from: l12)
        student: {init: {from_teacher: {encoder_layers: 6, decoder_layers: 6, strategy: sliced}}}

Per stage, besides any run key: `teacher_from: STAGE` (an earlier stage whose export is the teacher; default
the previous stage, none for the first) and `student_from: STAGE` (cut the student from that stage's export
instead of from the teacher; needs `from_teacher.strategy: sliced`). So `A -> B -> C` and `A -> {B, C}`
(both with `teacher_from: A`) can be written. Stage `S` runs in OUTPUT_DIR/S and is evaluated there (`eval/`).
A stage with `students:` (train/loop.py) trains them on one teacher pass, each in OUTPUT_DIR/S/NAME; later
stages name one of them as `S/NAME` (`teacher_from: l12/wide`), and so does the manifest.

All stages run in this one launch (both engines of a stage are freed before the next). OUTPUT_DIR/chain.json,
the manifest, records each finished stage: its resolved config, a fingerprint of that config and of the
exports it starts from, its export with the files' SHA-256, and its evaluation. A rerun skips finished stages
without touching their files, resumes an unfinished one from its newest checkpoint, and refuses a stage whose
config changed since it finished or started unless `--overwrite` names it.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import gc
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from ds_distill import dist
from ds_distill.config import paths
from ds_distill.config.load import NAME, expand_method, merge, parse_students, read_tree, with_base
from ds_distill.config.losses import OPTIONS, LossTerm, losses_tree
from ds_distill.config.run import RunConfig, to_dict, validate
from ds_distill.config.typed import from_dict
from ds_distill.errors import ConfigError
from ds_distill.train import checkpoint

MANIFEST = "chain.json"
CHAIN_KEYS = ("name", "teacher_from", "student_from")


@dataclass
class Stage:
    name: str
    tree: dict[str, Any]  # the stage's run config, before the paths of earlier stages are filled in
    teacher_from: str | None
    student_from: str | None
    students: tuple[str, ...] = ()  # a stage with `students:` trains them on one teacher pass

    @property
    def units(self) -> list[str]:
        """What the stage exports, as later stages and the manifest name it: the stage, or STAGE/STUDENT each."""
        return [f"{self.name}/{student}" for student in self.students] or [self.name]


def is_chain(tree: dict[str, Any]) -> bool:
    return "stages" in tree


def parse(tree: dict[str, Any]) -> tuple[Path, list[Stage]]:
    """The chain's output directory and its stages, checked before anything runs."""
    unknown = sorted(set(tree) - {"output_dir", "defaults", "stages"})
    if unknown:
        raise ConfigError(f"unknown chain key(s) {', '.join(unknown)}; a chain has output_dir, defaults and stages")
    if not tree.get("output_dir"):
        raise ConfigError("a chain needs output_dir: the directory its stages and manifest go to")
    stages_tree = tree.get("stages")
    if not isinstance(stages_tree, list) or not stages_tree:
        raise ConfigError("stages: must list at least one stage (each a run config with a name)")
    defaults = tree.get("defaults") or {}
    stages: list[Stage] = []
    for index, raw in enumerate(stages_tree):
        if not isinstance(raw, dict) or not raw.get("name"):
            raise ConfigError(f"stage {index + 1}: give it a name (name: l12)")
        name = str(raw["name"])
        if not NAME.match(name) or name in {s.name for s in stages}:
            raise ConfigError(f"stage name '{name}' must be unique and made of letters, digits, _ . -")
        earlier = [unit for s in stages for unit in s.units]
        teacher_from = raw.get("teacher_from", stages[-1].name if stages else None)
        for key, value in (("teacher_from", teacher_from), ("student_from", raw.get("student_from"))):
            if value is None or value in earlier:
                continue
            several = [unit for unit in earlier if unit.startswith(f"{value}/")]
            if several:
                raise ConfigError(
                    f"stage {name}: {key} '{value}' trains several students; name one ({', '.join(several)})"
                )
            raise ConfigError(f"stage {name}: {key} '{value}' is not an earlier stage ({', '.join(earlier)})")
        stage_tree = merge(defaults, {k: v for k, v in raw.items() if k not in CHAIN_KEYS})
        if ((stage_tree.get("losses") or {}).get("kd") or {}).get("cross_tokenizer"):
            raise ConfigError(f"stage {name}: losses.kd.cross_tokenizer does not work in a chain yet; run the stage "
                              "as a run of its own (ds-distill distill) with the earlier stage's export as teacher")  # fmt: skip
        students = tuple(str(s) for s in stage_tree["students"]) if isinstance(stage_tree.get("students"), dict) else ()
        stages.append(Stage(name, stage_tree, teacher_from, raw.get("student_from"), students))
    return Path(tree["output_dir"]), stages


def load(config: str | None, recipe: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    from ds_distill.config.load import apply_override, recipe_path

    if bool(config) == bool(recipe):
        raise ConfigError("give --config=CHAIN.yaml or --recipe=NAME")
    path = Path(config) if config else recipe_path(recipe)
    tree = read_tree(path)
    if not is_chain(tree):
        raise ConfigError(f"{config or recipe} is a run config, not a chain (no stages:); use ds-distill distill")
    for key, value in overrides.items():
        apply_override(tree, key, value)
    if isinstance(tree.get("defaults"), dict):  # defaults may start from a run YAML or recipe: `base: NAME`
        tree["defaults"] = with_base(tree["defaults"], path)
    return tree


def resolve_units(stage: Stage, output_dir: Path) -> dict[str, RunConfig]:
    """{unit: run config} of the stage (`Stage.units`), with the earlier stages' exports as teacher or source."""
    if not stage.students:
        return {stage.name: resolve(stage, output_dir)}
    tree = _with_sources(stage, output_dir)
    try:
        runs = parse_students(tree)
    except ConfigError as error:
        raise ConfigError(f"stage {stage.name}: {error}") from None
    return {f"{stage.name}/{student}": run for student, run in runs.items()}


def resolve(stage: Stage, output_dir: Path) -> RunConfig:
    """The stage's run config with the earlier stages' exports as its teacher or student source."""
    tree = _with_sources(stage, output_dir)
    try:
        run = from_dict(RunConfig, expand_method(tree))
        validate(run)
    except ConfigError as error:
        raise ConfigError(f"stage {stage.name}: {error}") from None
    return run


def _with_sources(stage: Stage, output_dir: Path) -> dict[str, Any]:
    """The stage's tree with the exports it starts from and its output directory filled in."""
    tree = copy.deepcopy(stage.tree)
    if stage.teacher_from:
        tree.setdefault("teacher", {})["model_name_or_path"] = str(output_dir / stage.teacher_from / "model")
        tree["teacher"].pop("gguf_file", None)
        tree["teacher"].pop("cache", None)  # a cache of the first teacher is not one of an export
    if stage.student_from:
        dims = ((tree.get("student") or {}).get("init") or {}).get("from_teacher")
        if not dims or dims.get("strategy") != "sliced":
            raise ConfigError(f"stage {stage.name}: student_from needs student.init.from_teacher.strategy: sliced")
        dims["source"] = str(output_dir / stage.student_from / "model")
    tree.setdefault("train", {})["output_dir"] = str(output_dir / stage.name)
    return tree


def tree_hash(directory: Path) -> str:
    """SHA-256 over the names and bytes of every file under `directory`."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(directory)).encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _set_keys(tree: dict, defaults: dict) -> dict:
    """The keys of `tree` whose values differ from `defaults` (so that an option a later version adds, at its
    default, leaves the fingerprints of finished stages as they were)."""
    kept = {}
    for key, value in tree.items():
        default = defaults.get(key) if isinstance(defaults, dict) else None
        if isinstance(value, dict) and isinstance(default, dict):
            value = _set_keys(value, default)
            if value:
                kept[key] = value
        elif value != default:
            kept[key] = value
    return kept


def fingerprint(run: RunConfig, stage: Stage, manifest: dict) -> str:
    """What a finished stage's result depends on: its resolved config (the keys set away from their defaults)
    and the exports it started from."""
    sources = {key: manifest["stages"][name]["export_sha256"]
               for key, name in (("teacher", stage.teacher_from), ("student", stage.student_from)) if name}  # fmt: skip
    return hashlib.sha256(json.dumps([settings(to_dict(run)), sources], sort_keys=True).encode()).hexdigest()


def settings(tree: dict) -> dict:
    """A resolved config tree (`to_dict`, or a run's saved config.yaml) reduced to what is set away from the
    defaults, as JSON holds it (tuples become lists); `method` is left out, already expanded into the losses."""
    tree = {k: v for k, v in json.loads(json.dumps(tree)).items() if k != "method"}
    losses = tree.pop("losses", None) or {}
    kept = _set_keys(tree, json.loads(json.dumps(to_dict(RunConfig()))))
    # every term by name, with what it sets away from its own options' defaults (a run writes them all)
    defaults = losses_tree({name: LossTerm(1.0, OPTIONS[name]()) for name in losses if name in OPTIONS})
    kept["losses"] = {name: _set_keys(term, json.loads(json.dumps(defaults.get(name, {}))))
                      for name, term in losses.items()}  # fmt: skip
    return kept


def read_manifest(output_dir: Path) -> dict:
    path = output_dir / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {"stages": {}}


def write_manifest(output_dir: Path, manifest: dict) -> None:
    staging = output_dir / (MANIFEST + ".partial")
    staging.write_text(json.dumps(manifest, indent=2) + "\n")
    with open(staging) as handle:
        os.fsync(handle.fileno())
    os.replace(staging, output_dir / MANIFEST)


def run_chain(tree: dict[str, Any], overwrite: tuple[str, ...] = ()) -> dict:
    """Runs the chain's stages in order (see the module docstring); returns the manifest."""
    from ds_distill.evaluation import evaluate_model
    from ds_distill.train.scoring import described

    output_dir, stages = parse(tree)
    unknown = sorted(set(overwrite) - {s.name for s in stages})
    if unknown:
        raise ConfigError(f"--overwrite names no stage of this chain: {', '.join(unknown)}")
    dist.init()
    manifest = dist.all_gather_objects(read_manifest(output_dir))[0]  # rank 0's view decides for all
    for stage in stages:
        runs = resolve_units(stage, output_dir)
        # the stages it starts from finished before it, unchanged since
        keys = {unit: fingerprint(run, stage, manifest) for unit, run in runs.items()}
        done = {unit: manifest["stages"].get(unit) for unit in runs}
        if all(d is not None and d["fingerprint"] == keys[u] for u, d in done.items()) and all(
            _export_intact(d) for d in done.values()
        ):
            dist.print_main(f"chain: stage {stage.name} finished earlier; its files stay as they are")
            continue
        _clear_if_changed(stage, runs, keys, manifest, overwrite)
        exports = _train_stage(stage, runs)
        for unit, export in exports.items():
            run, unit_dir = runs[unit], Path(runs[unit].train.output_dir)
            _free_memory()
            metrics = evaluate_model(str(export), scored(run), unit_dir / "eval")
            _free_memory()
            if dist.is_main():
                manifest["stages"][unit] = {
                    "fingerprint": keys[unit],
                    "teacher": run.teacher.model_name_or_path,
                    "student_from": stage.student_from,
                    "config": to_dict(run),
                    "export": str(export),
                    "export_sha256": tree_hash(export),
                    "evaluation": metrics,
                    "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                }
                write_manifest(output_dir, manifest)
            manifest = dist.all_gather_objects(manifest)[0]
            dist.print_main(f"chain: stage {unit} done: {described(metrics)}")
    return manifest


def _clear_if_changed(
    stage: Stage, runs: dict[str, RunConfig], keys: dict[str, str], manifest: dict, overwrite: tuple[str, ...]
) -> None:
    """Refuses a stage that finished or started with another config (or whose export changed) unless
    --overwrite names it; then removes its runs and their manifest entries."""
    for unit, run in runs.items():
        done = manifest["stages"].get(unit)
        if done is None and not _started_with_other_config(Path(run.train.output_dir), run):
            continue
        if done is not None and done["fingerprint"] == keys[unit] and _export_intact(done):
            continue  # this student of the stage is as it finished; another one is not
        if stage.name not in overwrite:
            if done is not None and done["fingerprint"] == keys[unit]:
                why = f"stage {unit}'s export {done['export']} changed since it finished"
            else:
                what = "finished" if done is not None else "started"
                why = f"stage {unit} {what} with another config (or from other exports of earlier stages)"
            raise ConfigError(f"{why}; pass --overwrite={stage.name} to redo it")
        if dist.is_main():
            for other, other_run in runs.items():
                manifest["stages"].pop(other, None)
                _remove_stage(Path(other_run.train.output_dir))
        dist.barrier()
        return


def _train_stage(stage: Stage, runs: dict[str, RunConfig]) -> dict[str, Path]:
    """Trains the stage's student (or students, on one teacher pass), resuming where all have checkpoints;
    returns {unit: export}."""
    from ds_distill.train.loop import train_student, train_students

    dirs = {unit: Path(run.train.output_dir) for unit, run in runs.items()}
    resume = all(
        dist.all_gather_objects(checkpoint.latest_tag(path / "checkpoints") is not None)[0] for path in dirs.values()
    )
    fresh = not resume and any(path.exists() for path in dirs.values())  # begun, no checkpoint: start again
    where = ", ".join(str(path) for path in dirs.values())
    dist.print_main(f"chain: stage {stage.name} ({'resuming' if resume else 'starting'}) in {where}")
    if not stage.students:
        return {stage.name: train_student(runs[stage.name], resume=resume, overwrite=fresh)}
    by_student = {unit.split("/", 1)[1]: run for unit, run in runs.items()}
    exports = train_students(by_student, resume=resume, overwrite=fresh)
    return {f"{stage.name}/{student}": export for student, export in exports.items()}


def scored(run: RunConfig) -> RunConfig:
    """The run as its stage's evaluation sees it: a translation or seq2seq stage always scores generations."""
    from ds_distill.evaluation import DEFAULT_METRIC

    if run.train.eval_metric != "loss" or run.data.task not in DEFAULT_METRIC:
        return run
    return dataclasses.replace(run, train=dataclasses.replace(run.train, eval_metric=DEFAULT_METRIC[run.data.task]))


def _export_intact(done: dict) -> bool:
    """Is a finished stage's export still what later stages were (or will be) built from? Rank 0 looks, every
    rank gets the answer."""
    export = Path(done["export"])
    intact = not dist.is_main() or (export.is_dir() and tree_hash(export) == done["export_sha256"])
    return all(dist.all_gather_objects(intact))


def _started_with_other_config(stage_dir: Path, run: RunConfig) -> bool:
    saved = stage_dir / "config.yaml"
    if not saved.is_file():
        return False
    return settings(paths.absolute_tree(yaml.safe_load(saved.read_text()))) != settings(to_dict(run))


def _remove_stage(stage_dir: Path) -> None:
    from ds_distill.config.run_dir import RUN_MARKER, check_replaceable

    check_replaceable(stage_dir, RUN_MARKER, "a ds_distill run", "stage output")
    if stage_dir.exists():
        shutil.rmtree(stage_dir)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def describe(tree: dict[str, Any]) -> list[tuple[str, RunConfig, Stage]]:
    """(unit, resolved run config, stage) per stage, or per student of a stage with several, for count_params."""
    output_dir, stages = parse(tree)
    return [(unit, run, stage) for stage in stages for unit, run in resolve_units(stage, output_dir).items()]


def planned_stages(tree: dict[str, Any]):
    """(name, run, teacher config, student config as trained, export config) per stage of a chain, each stage's
    teacher (and the model its student is cut from) being an earlier stage's export, known before it exists."""
    import dataclasses

    from ds_distill import models
    from ds_distill.surgery.prune import target_config
    from ds_distill.train.student import student_hf_config

    exported = {}
    for name, run, stage in describe(tree):
        if stage.teacher_from:
            teacher_config = exported[stage.teacher_from]
            run = dataclasses.replace(
                run, teacher=dataclasses.replace(run.teacher, model_name_or_path=f"stage {stage.teacher_from}")
            )
        else:
            teacher_config = models.load_config(models.teacher_weights(run.teacher), "teacher")
        source = teacher_config
        if stage.student_from:
            source = exported[stage.student_from]
            dims = dataclasses.replace(run.student.init.from_teacher, source=None)
            student = dataclasses.replace(run.student, init=dataclasses.replace(run.student.init, from_teacher=dims))
            run = dataclasses.replace(run, student=student)
        student_config = student_hf_config(run.student, source)
        exported[name] = target_config(student_config, run.prune) if run.prune else student_config
        yield name, run, teacher_config, student_config, exported[name]
