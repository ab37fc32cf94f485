"""The command line before fire sees it: the launcher's `--local_rank` taken out, and the flags checked against
the verb's signature, so that a missing or unknown flag is a one-line error with the verb's usage instead of
fire's trace."""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Callable

from ds_distill.errors import ConfigError


def flag(value, name: str) -> bool:
    """A switch such as --overwrite, which takes no value."""
    if isinstance(value, bool):
        return value
    raise ConfigError(f"--{name} takes no value (got {value!r})")


def resume_flag(value) -> bool | str:
    """--resume (continue this run, refused without a checkpoint) or --resume=auto (continue it when it has one)."""
    if isinstance(value, bool) or value == "auto":
        return value
    raise ConfigError(f"--resume takes no value, or =auto (got {value!r})")


def strip_launcher_flags(argv: list[str]) -> list[str]:
    """Removes `--local_rank=N` / `--local_rank N` (the DeepSpeed launcher adds it) and exports LOCAL_RANK."""
    out, skip_next = [], False
    for i, arg in enumerate(argv):
        if skip_next:
            skip_next = False
            continue
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip_next = True
        else:
            out.append(arg)
    return out


def given_flags(args: list[str]) -> tuple[list[str], set[str]]:
    """(positional values, flag names) as fire reads `args`: `--name=value`, `--name value` (the next argument
    when it is not a flag) and `--name` alone; hyphens in names read as underscores."""
    positional, names, index = [], set(), 0
    while index < len(args):
        arg = args[index]
        if arg.startswith("--") and len(arg) > 2:
            name, has_value, _ = arg[2:].partition("=")
            names.add(name.replace("-", "_"))
            if not has_value and index + 1 < len(args) and not args[index + 1].startswith("--"):
                index += 1
        else:
            positional.append(arg)
        index += 1
    return positional, names


def check_command(verb: str, function: Callable, args: list[str]) -> None:
    """Raises ConfigError for flags `function` does not take, values for parameters it lacks and required
    parameters left out: what fire would otherwise report with its own trace."""
    parameters = inspect.signature(function).parameters.values()
    named = {p.name for p in parameters if p.kind is not p.VAR_KEYWORD}
    takes_dotted = any(p.kind is p.VAR_KEYWORD for p in parameters)
    positional, names = given_flags(args)
    for name in sorted(names):
        known = name in named or (name.startswith("no") and name[2:] in named)  # fire's --noflag is flag=False
        close = difflib.get_close_matches(name, sorted(named), n=1, cutoff=0.8)
        if not known and (not takes_dotted or (close and "." not in name)):  # --overwite is no config key
            hint = f". Did you mean --{close[0]}?" if close else ""
            raise ConfigError(f"ds-distill {verb} has no flag --{name}{hint} Its flags: {', '.join(sorted(named))}")
    open_slots = [p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD and p.name not in names]
    if len(positional) > len(open_slots):
        extra = positional[len(open_slots) :]
        raise ConfigError(f"ds-distill {verb} does not take {' '.join(extra)!r} (flags are written --name=value)")
    filled = set(open_slots[: len(positional)]) | names
    missing = [p.name for p in parameters if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD]
    missing = [name for name in missing if name not in filled]
    if missing:
        raise ConfigError(f"ds-distill {verb} needs {' '.join(f'--{name}=...' for name in missing)}")
