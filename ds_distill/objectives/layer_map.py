"""Which student layer learns from which teacher layer, per stack (`encoder`, `decoder`), as data.

Layer 0 is the output of the embeddings (the input of block 1), layer i the output of block i. A map is
resolved from the two models' configs alone, so a wrong map fails before any weights load::

    layer_map: {encoder: uniform, decoder: [[1, 2], [2, 4]], include_embeddings: true}
    --layer_map.decoder=1:2,2:4        # the same pairs from the command line
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ds_distill.config.losses import LayerMapConfig
from ds_distill.errors import ConfigError


@dataclass(frozen=True)
class LayerPair:
    stack: str  # "encoder" | "decoder"
    student: int
    teacher: int

    def __str__(self) -> str:
        return f"{self.stack} {self.student}->{self.teacher}"


def uniform(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    # Half-up rounding (not Python's round-half-to-even), so 3 -> 2 layers maps 1->2 and 2->3 as written.
    return [(i, math.floor(i * teacher_layers / student_layers + 0.5)) for i in range(1, student_layers + 1)]


def last(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    return [(student_layers, teacher_layers)]


STRATEGIES: dict[str, tuple[Callable[[int, int], list[tuple[int, int]]], str]] = {
    "uniform": (uniform, "student block i <- teacher block round(i * n_teacher / n_student) (2i at half depth)"),
    "last": (last, "last student block <- last teacher block (MiniLM, MiniLMv2)"),
}
EXPLICIT_HELP = "explicit pairs [[student, teacher], ...] or '1:2,2:4'; many-to-one allowed"


def _explicit_pairs(spec: Any, where: str) -> list[tuple[int, int]]:
    if isinstance(spec, dict):
        items = list(spec.items())
    elif isinstance(spec, str):
        items = spec.split(",")
    elif isinstance(spec, (list, tuple)):
        items = list(spec)
    else:
        items = [spec]
    pairs = []
    for item in items:
        if isinstance(item, str) and ":" in item:
            item = item.split(":")
        try:
            student, teacher = (int(x) for x in item)
        except (TypeError, ValueError):
            raise ConfigError(
                f"{where}: cannot read {item!r} as a [student, teacher] pair; give a strategy "
                f"({', '.join(STRATEGIES)}) or {EXPLICIT_HELP}"
            ) from None
        pairs.append((student, teacher))
    if not pairs:
        raise ConfigError(f"{where} is empty; give a strategy ({', '.join(STRATEGIES)}) or {EXPLICIT_HELP}")
    return pairs


def resolve_stack(
    spec: Any, include_embeddings: bool, student_layers: int, teacher_layers: int, where: str
) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs of one stack, checked against both depths."""
    if isinstance(spec, str) and ":" not in spec:
        if spec not in STRATEGIES:
            raise ConfigError(f"{where} '{spec}' is unknown; choose one of {', '.join(STRATEGIES)} or {EXPLICIT_HELP}")
        pairs = STRATEGIES[spec][0](student_layers, teacher_layers)
    else:
        pairs = _explicit_pairs(spec, where)
    if include_embeddings and not any(s == 0 for s, _ in pairs):
        pairs = [(0, 0), *pairs]
    for student, teacher in pairs:
        for role, layer, depth in (("student", student, student_layers), ("teacher", teacher, teacher_layers)):
            if not 0 <= layer <= depth:
                raise ConfigError(
                    f"{where} maps {role} layer {layer} but the {role} has {depth} layers "
                    f"(1..{depth}; 0 is the embeddings)"
                )
    return pairs


def resolve(spec: LayerMapConfig, depths: dict[str, tuple[int, int]], where: str = "layer_map") -> list[LayerPair]:
    """All pairs for the stacks both models have; `depths` maps stack -> (student layers, teacher layers)."""
    pairs = []
    for stack, (student_layers, teacher_layers) in depths.items():
        stack_spec = getattr(spec, stack)
        for student, teacher in resolve_stack(
            stack_spec, spec.include_embeddings, student_layers, teacher_layers, f"{where}.{stack}"
        ):
            pairs.append(LayerPair(stack, student, teacher))
    return pairs


def describe_strategies() -> dict[str, str]:
    """One line per strategy, for `ds-distill list`."""
    return {**{name: line for name, (_, line) in STRATEGIES.items()}, "explicit": EXPLICIT_HELP}
