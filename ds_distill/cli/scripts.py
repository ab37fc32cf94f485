"""The python side of the launch scripts (`deepspeed launch_scripts/flan_t5_3b.sh` runs the file with python on
every rank): the same run as their bash side's `run_args` in launch_scripts/_common.sh builds, from the same
environment variables. A test keeps the two sides equal."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import yaml

from ds_distill.config.deepspeed import TEACHER_PLACEMENTS
from ds_distill.config.load import RECIPES_DIR


def run_args(verb: str, default_recipe: str, environ: Mapping[str, str] = os.environ) -> list[str]:
    """Flags of `ds-distill VERB` (distill or chain): CONFIG=FILE.yaml as written (ZERO_STAGE and TEACHER override
    it only when set), or RECIPE=NAME (default `default_recipe`) with the student under ZeRO-${ZERO_STAGE:-2} and
    the teacher placed by TEACHER (default replicated); OUTPUT, or the config's output directory, or runs/NAME.
    A distill run resumes with --resume=auto: the same command run again goes on from its newest checkpoint."""
    keys, output_key = ("defaults.", "output_dir") if verb == "chain" else ("", "train.output_dir")
    zero_stage, teacher = environ.get("ZERO_STAGE"), environ.get("TEACHER")
    if environ.get("CONFIG"):
        args = [f"--config={environ['CONFIG']}"]
        output = environ.get("OUTPUT") or _output_dir(environ["CONFIG"], output_key) or f"runs/{verb}"
    else:
        recipe = environ.get("RECIPE") or default_recipe
        args = [f"--recipe={recipe}"]
        output = environ.get("OUTPUT") or f"runs/{recipe}"
        zero_stage, teacher = zero_stage or "2", teacher or "replicated"
    if zero_stage:
        args.append(f"--{keys}student.deepspeed_config=ds_configs/student_zero{zero_stage}.json")
    if teacher:
        args.append(f"--{keys}teacher.deepspeed_config={TEACHER_PLACEMENTS[teacher]}")
    return [*args, f"--{output_key}={output}", *(["--resume=auto"] if verb == "distill" else [])]


def _output_dir(config: str, dotted: str) -> str | None:
    """The config's own output directory, read from its folder (config/paths.py; a shipped recipe's from the
    working directory)."""
    tree = yaml.safe_load(open(config)) or {}
    for key in dotted.split("."):
        tree = tree.get(key) or {}
    folder = "" if Path(config).resolve().is_relative_to(RECIPES_DIR.resolve()) else os.path.dirname(config)
    return os.path.join(folder, os.path.expanduser(tree)) if tree else None
