"""How a run config's paths are read. One rule: a relative path written in a YAML file is read from that
file's folder (a base's paths from the base's folder); a path given on the command line (a dotted override)
from the working directory, as any command-line path; `~` is the home directory. Once a run config is
checked, its local paths are absolute, so the config.yaml a run saves reads the same from anywhere.

Shipped recipes and the project's `ds_configs/` are the two places outside that rule: a recipe has no folder of
the user's, so its paths (`runs/...`, `data/...`) are read from the working directory, and a DeepSpeed config
`ds_configs/NAME.json` that is not where a path points is the project's own, so a YAML anywhere may name
`ds_configs/student_zero2.json`.

A model, tokenizer or dataset field holds a hub id or a path: it is a path when it starts with `/`, `~`, `./` or
`../`, or names something that exists beside the YAML; anything else is a hub id.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from ds_distill.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
"""The checkout or installed tree that holds `ds_configs/` and `ds_distill/`."""

PATH_KEYS = ("teacher.deepspeed_config", "teacher.cache", "student.deepspeed_config", "data.tokenized_path",
             "train.output_dir")  # fmt: skip
"""Keys that always name a local file or directory."""
NAME_OR_PATH_KEYS = ("teacher.model_name_or_path", "student.model_name_or_path", "data.tokenizer", "data.dataset",
                     "student.init.from_teacher.source", "student.init.from_teacher.tokenizer")  # fmt: skip
"""Keys that name a hub id or a local path."""
DEEPSPEED_KEYS = ("teacher.deepspeed_config", "student.deepspeed_config")
FILE_BUILDERS = ("json", "csv", "parquet", "text")
"""`data.dataset` values that read local files: only then are `data.data_files` paths (a hub dataset's are
patterns inside its repository)."""


def local_files(dataset: object, value: str) -> bool:
    """Is `value`, a `data.data_files` entry of `dataset`, a local path (not a URL, not inside a hub repo)?"""
    return (dataset is None or dataset in FILE_BUILDERS) and "://" not in value


def looks_local(value: str) -> bool:
    return value.startswith(("/", "~", "./", "../")) or value in (".", "..")


def project_deepspeed_config(value: str) -> str | None:
    """The project's own DeepSpeed config that `value` (`ds_configs/NAME.json`) names, if it is one."""
    if os.path.isabs(value):
        return None
    candidate = PROJECT_ROOT / value
    return str(candidate) if candidate.is_file() else None


def in_yaml(tree: dict[str, Any], folder: Path, where: str) -> dict[str, Any]:
    """A copy of a YAML file's own tree with the relative paths of its sections (a run's, its `students:`', a
    chain's `defaults:` and `stages:`') read from `folder`, the YAML's folder."""
    folder = folder.absolute()
    tree = copy.deepcopy(tree)
    if isinstance(tree.get("output_dir"), str):  # a chain's
        tree["output_dir"] = _joined(tree["output_dir"], folder)
    units = [(tree, where)]
    if isinstance(tree.get("defaults"), dict):
        units.append((tree["defaults"], f"{where}, defaults"))
    if isinstance(tree.get("stages"), list):
        units += [(stage, f"{where}, stage {stage.get('name')}") for stage in tree["stages"] if isinstance(stage, dict)]
    for sections, unit in list(units):  # a run's, the defaults' or a stage's students
        if isinstance(sections.get("students"), dict):
            units += [(entry, f"{unit}, student {name}") for name, entry in sections["students"].items()]
    for sections, unit in units:
        if isinstance(sections, dict):
            _sections_in_yaml(sections, folder, unit)
    return tree


def _sections_in_yaml(sections: dict[str, Any], folder: Path, where: str) -> None:
    for key in PATH_KEYS + NAME_OR_PATH_KEYS:
        *path, name = key.split(".")
        parent = sections
        for part in path:
            parent = parent.get(part) if isinstance(parent, dict) else None
        value = parent.get(name) if isinstance(parent, dict) else None
        if not isinstance(value, str) or not value or os.path.isabs(os.path.expanduser(value)):
            continue
        joined = _joined(value, folder)
        if key in DEEPSPEED_KEYS and not os.path.exists(joined):
            joined = project_deepspeed_config(value) or joined
        elif key in NAME_OR_PATH_KEYS and not (looks_local(value) or os.path.exists(joined)):
            if os.path.exists(value):
                raise ConfigError(
                    f"{where}: {key} {value}: not found beside the config ({joined}), but there is a {value} in the "
                    "working directory; a config's relative paths are read from its folder: write an absolute "
                    "path or one relative to the config"
                )
            continue  # a hub id
        parent[name] = joined
    data = sections.get("data")
    files = data.get("data_files") if isinstance(data, dict) else None
    if isinstance(files, dict):
        dataset = data.get("dataset")  # None: set by a base or on the command line; local files are the common case

        def joined(path):
            return _joined(path, folder) if isinstance(path, str) and local_files(dataset, path) else path

        for split, paths in files.items():
            files[split] = [joined(p) for p in paths] if isinstance(paths, list) else joined(paths)


def _joined(value: str, folder: Path) -> str:
    value = os.path.expanduser(value)
    return value if os.path.isabs(value) else os.path.normpath(folder / value)


def absolute_tree(tree: dict[str, Any]) -> dict[str, Any]:
    """A copy of a run's saved tree (a config.yaml) with its local paths absolute, read from the working directory:
    a run saved before checked runs' paths became absolute compares equal to the same run now."""
    tree = copy.deepcopy(tree)
    for key in PATH_KEYS + NAME_OR_PATH_KEYS:
        *path, name = key.split(".")
        parent: Any = tree
        for part in path:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if isinstance(parent, dict) and isinstance(parent.get(name), str) and parent[name]:
            parent[name] = absolute(parent[name], key)
    data = tree.get("data")
    files = data.get("data_files") if isinstance(data, dict) else None
    if isinstance(files, dict):

        def absolute_file(path):
            local = isinstance(path, str) and local_files(data.get("dataset"), path)
            return absolute(path, "data.data_files") if local else path

        for split, paths in files.items():
            files[split] = [absolute_file(p) for p in paths] if isinstance(paths, list) else absolute_file(paths)
    return tree


def absolute(value: str, key: str) -> str:
    """A checked run's `key` with a path as the working directory reads it, absolute (hub ids unchanged)."""
    expanded = os.path.expanduser(value)
    if key in DEEPSPEED_KEYS and not os.path.exists(expanded):
        return project_deepspeed_config(expanded) or os.path.abspath(expanded)
    if key in NAME_OR_PATH_KEYS and not (looks_local(value) or os.path.exists(expanded)):
        return value
    return os.path.abspath(expanded)
