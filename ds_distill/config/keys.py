"""Every key a run config may hold, with its type, default and docstring, read from the dataclasses themselves
(the attribute docstrings from their source), so no key needs the source to be found:

    ds-distill keys              every key of the run config and of each loss term
    ds-distill keys train        one section (or a deeper one: student.init.from_teacher, losses.kd)
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from dataclasses import MISSING, dataclass
from typing import Any


@dataclass
class Key:
    name: str
    """Dotted, as a YAML nests it or an override flag names it: `train.learning_rate`."""
    type: str
    default: str
    doc: str


def attribute_docs(cls: type) -> dict[str, str]:
    """Each field's docstring: the string literal that follows its annotated line in the class body (or in the
    body of the dataclass it inherits the field from)."""
    docs: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(base):
            continue
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(base))).body[0].body
        except (OSError, TypeError):  # no source at hand
            continue
        for node, after in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and _is_string(after):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _is_string(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def type_name(hint: Any) -> str:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return " | ".join(type_name(arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is not None:
        origin = typing.get_origin(hint)
        return (
            f"{getattr(origin, '__name__', repr(origin))}[{', '.join(type_name(arg) for arg in typing.get_args(hint))}]"
        )
    return "None" if hint is type(None) else getattr(hint, "__name__", repr(hint))


def nested_dataclass(hint: Any) -> type | None:
    """The dataclass a field holds (itself or under `| None`), else None."""
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    for candidate in (hint, *(typing.get_args(hint) if union else ())):
        if dataclasses.is_dataclass(candidate) and isinstance(candidate, type):
            return candidate
    return None


def keys(cls: type, prefix: str = "", whole: tuple[str, ...] = ()) -> list[Key]:
    """The keys of dataclass `cls`, depth first, a nested dataclass's under its field's name (but the fields
    named in `whole`, listed as one key). An optional section (`| None = None`) is off until given; its keys
    then take the defaults listed."""
    hints, docs, found = typing.get_type_hints(cls), attribute_docs(cls), []
    for field in dataclasses.fields(cls):
        name, hint = f"{prefix}{field.name}", hints[field.name]
        nested = nested_dataclass(hint)
        if field.default is not MISSING:
            default = repr(field.default)
        elif field.default_factory is not MISSING:  # a section always there shows its keys' defaults instead
            default = "" if nested or "parse" in field.metadata else repr(field.default_factory())
        else:
            default = "(required)"
        doc = docs.get(field.name, "")
        if nested is not None:
            own = nested.__doc__ or ""  # dataclass writes a signature where a class has no docstring
            doc = doc or ("" if own.startswith(f"{nested.__name__}(") else inspect.cleandoc(own))
        found.append(Key(name, type_name(hint), default, doc))
        if nested is not None and field.name not in whole:
            found += keys(nested, f"{name}.")
    return found


def described(found: list[Key], width: int = 100) -> str:
    lines = []
    for key in found:
        head = f"{key.name}: {key.type}" + (f" = {key.default}" if key.default else "")
        lines.append(head)
        if key.doc:
            lines += textwrap.wrap(" ".join(key.doc.split()), width, initial_indent="    ", subsequent_indent="    ")
    return "\n".join(lines)
