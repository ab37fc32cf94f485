"""Reading a run config: YAML files and shipped recipes (`base:` chains), dotted overrides, method presets,
then typed parsing (config/typed.py) into the dataclasses of config/run.py and validation::

    ds-distill distill --config=run.yaml --train.max_steps=10 --losses.kd.temperature=2
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import yaml

from ds_distill.config import paths
from ds_distill.config.methods import METHODS
from ds_distill.config.run import RunConfig, validate
from ds_distill.config.typed import field_names, from_dict, unknown_key_error
from ds_distill.errors import ConfigError

RECIPES_DIR = Path(__file__).parents[1] / "recipes"


# ---------------------------------------------------------------------------------------------------------
# YAML + overrides.


def recipe_path(name: str) -> Path:
    """The shipped recipe `name` (with or without `.yaml`)."""
    path = RECIPES_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
    if not path.is_file():
        available = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("[!_]*.yaml")))
        raise ConfigError(f"no recipe named '{name}'. Available: {available}")
    return path


def apply_override(tree: dict[str, Any], dotted_key: str, value: Any) -> None:
    """Sets `a.b.c = value` inside nested dicts, creating mappings on the way."""
    parts = dotted_key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set '{dotted_key}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def read_tree(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config as a tree, with its `base:` (a file beside it, or a shipped recipe) merged under it key by
    key, so that sizes of one recipe share everything else (bases may have bases)."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    tree = read_yaml(path)
    if tree is None:
        raise ConfigError(f"{path} is empty; a run config holds the sections {field_names(RunConfig)}")
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} must hold a mapping with the sections {field_names(RunConfig)}")
    if not path.resolve().is_relative_to(RECIPES_DIR.resolve()):  # a recipe's paths are the working directory's
        tree = paths.in_yaml(tree, path.parent, str(path))
    return with_base(tree, path, seen)


def read_yaml(path: Path) -> Any:
    """The YAML document in `path`; a syntax error names the file, line and column."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        context = getattr(error, "context", None)
        raise ConfigError(f"{where}: not valid YAML ({context + ': ' if context else ''}{problem})") from None


def with_base(tree: dict[str, Any], path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """`tree` (read from `path`) merged over its `base:`, if it names one."""
    tree = dict(tree)
    base = tree.pop("base", None)
    if base is None:
        return tree
    base = os.path.expanduser(str(base))
    if (path.parent / str(base)).is_file():
        base_path = path.parent / str(base)
    elif str(base).endswith((".yaml", ".yml")) and not (RECIPES_DIR / str(base)).is_file():
        raise ConfigError(f"{path}: base {base}: no file {path.parent / str(base)} (a base is read beside the "
                          "config that names it) and no shipped recipe of that name")  # fmt: skip
    else:
        base_path = recipe_path(str(base))
    if base_path.resolve() in seen:
        raise ConfigError(f"{path}: base {base} leads back to itself")
    return merge(read_tree(base_path, (*seen, path.resolve())), tree)


def merge(under: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` merged onto a copy of `under`, mapping by mapping; values of `over` win."""
    merged = copy.deepcopy(under)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def expand_method(tree: dict[str, Any]) -> dict[str, Any]:
    """The config tree with its `method` preset (methods.py) filled in under the config's own keys."""
    name = tree.get("method")
    if not name:
        return tree
    if name not in METHODS:
        raise ConfigError(f"method '{name}' is unknown; choose one of {', '.join(METHODS)}")
    method = METHODS[name]
    for section in ("losses", "layer_map"):
        if tree.get(section) is not None and not isinstance(tree[section], dict):
            raise ConfigError(f"{section} must be a mapping, got {tree[section]!r}")
    expanded = dict(tree)
    own_losses = {k: (v if v is not None else {}) for k, v in (tree.get("losses") or {}).items()}
    expanded["losses"] = merge(method.losses, own_losses)
    if method.layer_map is not None:
        expanded["layer_map"] = merge(method.layer_map, tree.get("layer_map") or {})
    return expanded


def load_tree(
    config: str | None = None, recipe: str | None = None, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A YAML file or shipped recipe as a tree, its `base:` merged in and dotted overrides applied."""
    if config and recipe:
        raise ConfigError("give either --config=FILE or --recipe=NAME, not both")
    tree: dict[str, Any] = {}
    if config or recipe:
        tree = read_tree(Path(config) if config else recipe_path(recipe))
    for key, value in (overrides or {}).items():
        apply_override(tree, key, value)
    return tree


def parse_run(tree: dict[str, Any]) -> RunConfig:
    """A run config tree (method preset expanded) as a validated `RunConfig`."""
    if "students" in tree:
        raise ConfigError("this config trains several students (students:); ds-distill distill runs it")
    run = from_dict(RunConfig, expand_method(tree))
    validate(run)
    return run


def load_config(
    config: str | None = None, recipe: str | None = None, overrides: dict[str, Any] | None = None
) -> RunConfig:
    """Reads a YAML file or shipped recipe, applies dotted overrides and validates the result."""
    return parse_run(load_tree(config, recipe, overrides))


SHARED_SECTIONS = ("teacher", "data")
"""What one teacher pass and one batch stream serve to every student of a run."""
SHARED_TRAIN_KEYS = (
    "output_dir", "max_steps", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
    "seed", "group_by_length", "dataloader_num_workers", "dataloader_pin_memory", "save_steps", "save_total_limit",
    "ddp_timeout", "torch_compile",
)  # fmt: skip
"""`train` keys the students share: the batches and steps, the checkpoints they resume from together."""
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
"""A student's or a chain stage's name: it names a directory."""


def parse_students(tree: dict[str, Any]) -> dict[str, RunConfig]:
    """A config with `students:` as one validated `RunConfig` per student. Each entry overrides the run's own
    sections key by key (as a chain stage overrides `defaults`) and trains into `train.output_dir/NAME`."""
    students = tree.get("students")
    if not isinstance(students, dict) or not students:
        raise ConfigError("students: must map each student's name to its overrides, e.g. {small: {student: ...}}")
    shared = {key: value for key, value in tree.items() if key != "students"}
    output_dir = Path((shared.get("train") or {}).get("output_dir", RunConfig().train.output_dir))
    runs = {}
    for name, entry in students.items():
        where = f"students.{name}"
        if not NAME.match(str(name)):
            raise ConfigError(f"{where}: a student's name is its directory; use letters, digits, '_', '.' and '-'")
        entry = entry or {}
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a mapping of run sections, got {entry!r}")
        for key in entry:
            if key in SHARED_SECTIONS:
                raise ConfigError(
                    f"{where}.{key}: one teacher pass and one batch stream serve every student; set {key} "
                    "outside students:"
                )
            if key not in field_names(RunConfig):
                raise unknown_key_error(
                    key, [f for f in field_names(RunConfig) if f not in SHARED_SECTIONS], f"{where}."
                )
        for key in entry.get("train") or {}:
            if key in SHARED_TRAIN_KEYS:
                raise ConfigError(
                    f"{where}.train.{key}: the students share batches, steps and checkpoints; set train.{key} "
                    "outside students:"
                )
        merged = merge(shared, entry)
        merged.setdefault("train", {})["output_dir"] = str(output_dir / str(name))
        try:
            runs[str(name)] = parse_run(merged)
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from None
    return runs
