"""The `ds-distill` command (also `python -m ds_distill`): one verb per user task.

    ds-distill demo                                   the whole job on an embedded default, in minutes
    ds-distill distill --config=RUN.yaml [--a.b=v]    one distillation run (or --recipe=NAME)
    ds-distill prepare_data --config=RUN.yaml         tokenize to data.tokenized_path ahead of a launch
    ds-distill cache_teacher --config=RUN.yaml --output_dir=DIR [--top_k=64]   the teacher's top-k on disk
    ds-distill generate_targets --config=RUN.yaml --output_dir=DIR [--num_beams=5]   its outputs as targets
    ds-distill make_student --teacher=T --output_dir=D [--d_model ...]   a student cut from the teacher
    ds-distill train_tokenizer --config=RUN.yaml --vocab_size=8000 --output_dir=D   a compact student vocabulary
    ds-distill chain --config=CHAIN.yaml              teacher -> assistant(s) -> student, resumable by stage
    ds-distill evaluate --model=DIR --config=RUN.yaml   loss, perplexity, BLEU + chrF or ROUGE; report + hypotheses
    ds-distill export --checkpoint_dir=D --output_dir=O
    ds-distill count_params PATH_OR_RECIPE             (or --recipe=NAME, --config=RUN.yaml)
    ds-distill plan --config=RUN.yaml --gpus_per_node=8 --gpu_memory_gb=80   memory per GPU, what fits, fastest
    ds-distill list                                   recipes, methods, losses, layer maps, families, configs
    ds-distill keys [SECTION]                         every run-config key: type, default, what it does
    ds-distill VERB --help                            ds-distill --version

Under the DeepSpeed launcher every rank runs `python -u -m ds_distill ... --local_rank=N`; that flag is
taken out here (its value is in LOCAL_RANK) so fire never sees it.
"""

from __future__ import annotations

import difflib
import inspect
import os
import sys

import fire

from ds_distill.cli.args import check_command, strip_launcher_flags
from ds_distill.cli.components import first_sentence, keys, list_components
from ds_distill.cli.evaluate import evaluate
from ds_distill.cli.jobs import cache_teacher, chain, demo, distill, generate_targets, prepare_data
from ds_distill.cli.plan import plan
from ds_distill.cli.students import count_params, export, make_student, train_tokenizer
from ds_distill.errors import ConfigError

VERBS = {
    "demo": demo,
    "distill": distill,
    "prepare_data": prepare_data,
    "cache_teacher": cache_teacher,
    "generate_targets": generate_targets,
    "make_student": make_student,
    "train_tokenizer": train_tokenizer,
    "export": export,
    "count_params": count_params,
    "list": list_components,
    "keys": keys,
    "chain": chain,
    "evaluate": evaluate,
    "plan": plan,
}


def usage() -> str:
    lines = ["usage: ds-distill VERB [ARGS]   (ds-distill VERB --help for details; ds-distill --version)", "", "verbs:"]
    for name, function in VERBS.items():
        lines.append(f"  {name:<16} {first_sentence(inspect.getdoc(function))}")
    return "\n".join(lines)


def verb_help(name: str) -> str:
    return f"{verb_usage(name)}\n\n{inspect.getdoc(VERBS[name])}"


def verb_usage(name: str) -> str:
    return f"usage: ds-distill {name} {_flags(inspect.signature(VERBS[name]))}"


METAVARS = {"config": "PATH", "recipe": "NAME", "output_dir": "DIR", "checkpoint_dir": "DIR", "model": "DIR",
            "teacher": "DIR_OR_HUB_ID", "data": "PATH", "path_or_recipe": "PATH_OR_RECIPE"}  # fmt: skip


def _flags(signature: inspect.Signature) -> str:
    """`--name=PATH` where a value is needed, `[--name=DEFAULT]` where one is set, `[--switch]` for switches."""
    parts = []
    for param in signature.parameters.values():
        value = METAVARS.get(param.name, param.name.upper())
        if param.kind is param.VAR_KEYWORD:
            parts.append("[--SECTION.KEY=VALUE ...]")
        elif param.kind is param.VAR_POSITIONAL:
            continue
        elif param.default is inspect.Parameter.empty:
            parts.append(f"--{param.name}={value}")
        elif isinstance(param.default, bool):
            parts.append(f"[--{param.name}]")
        elif param.default is None or param.default == ():
            parts.append(f"[--{param.name}={value}]")
        else:
            parts.append(f"[--{param.name}={param.default}]")
    return " ".join(parts)


def main(argv: list[str] | None = None) -> None:
    argv = strip_launcher_flags(list(sys.argv[1:] if argv is None else argv))
    if not argv:
        print(usage(), file=sys.stderr)
        sys.exit(2)
    if argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    if argv[0] in ("-V", "--version"):
        from ds_distill import __version__

        print(f"ds-distill {__version__}")
        return
    if argv[0] not in VERBS:
        close = difflib.get_close_matches(argv[0], list(VERBS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(f"error: unknown verb '{argv[0]}'{hint}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    if any(arg in ("-h", "--help") for arg in argv[1:]):
        print(verb_help(argv[0]))
        return
    try:
        check_command(argv[0], VERBS[argv[0]], argv[1:])
    except ConfigError as error:
        print(f"error: {error}\n{verb_usage(argv[0])}", file=sys.stderr)
        sys.exit(2)
    from ds_distill import dist

    caller_group = dist.initialized()  # a caller's process group (main called from Python) is the caller's to end
    try:
        fire.Fire(VERBS[argv[0]], command=argv[1:], name=f"ds-distill {argv[0]}")
    except ConfigError as error:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {error}", file=sys.stderr)
        _refused_exit(group_started_here=dist.initialized() and not caller_group)
    except BrokenPipeError:  # the reader stopped early (`ds-distill keys | head`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush finds no pipe
        sys.exit(0)
    except Exception as error:
        from ds_distill import peers

        peers.explain(error)  # a lost rank: ends the process naming it; otherwise the error is raised as it is
        raise
    if not caller_group:
        dist.shutdown()


def _refused_exit(group_started_here: bool) -> None:
    """Exits with status 2 after a refusal. Once the command has started the process group, a normal interpreter
    exit may abort in the process group's C++ threads ("terminate called without an active exception", status
    250 instead of 2); the group cannot be left in step either, since one rank alone may have refused. So leave
    at once; without a group of its own, an ordinary SystemExit (a caller in Python can catch it)."""
    if not group_started_here:
        sys.exit(2)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(2)
