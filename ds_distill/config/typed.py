"""Plain dicts (YAML, dotted flags) as typed dataclasses: values coerced to the declared field types, unknown keys
refused with the valid ones listed. The boundary where fire's guesses (`--data.prefix=1` arrives as an int) become
the types the code reads."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any

from ds_distill.errors import ConfigError


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def coerce(value: Any, tp: Any, where: str) -> Any:
    tp, optional = _unwrap_optional(tp)
    if value is None or (optional and value in ("", "none", "None", "null")):
        if optional:
            return None
        raise ConfigError(f"{where} must not be empty")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping of {field_names(tp)}, got {value!r}")
        return from_dict(tp, value, where)
    origin = typing.get_origin(tp)
    if origin is list:
        if isinstance(value, str):  # "0,2,4" from a flag
            value = [part for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):  # fire reads `0,2,4` as a tuple and `0` as an int
            value = [value]
        (item_tp,) = typing.get_args(tp)
        return [coerce(item, item_tp, f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        key_tp, value_tp = typing.get_args(tp)
        return {str(k): coerce(v, value_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        try:
            number = float(value) if isinstance(value, str) else value  # "1e3" from YAML or a flag
            if isinstance(number, bool) or not float(number).is_integer():
                raise ValueError
            return int(number)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be an integer, got {value!r}") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (tuple, list)):  # fire reads `a,b` as a tuple
            return ",".join(str(v) for v in value)
        return str(value)
    return value


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def unknown_key_error(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown key '{where}{key}'.{hint} Valid keys: {', '.join(valid)}")


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Builds dataclass `cls` from `data`, coercing values to the field types (or parsing them with a field's
    own `metadata["parse"]`, as `RunConfig.losses`); unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    prefix = f"{where}." if where else ""
    for key in data:
        if key not in fields:
            raise unknown_key_error(key, list(fields), prefix)
    kwargs = {}
    for key, value in data.items():
        parse = fields[key].metadata.get("parse")
        kwargs[key] = parse(value, f"{prefix}{key}") if parse else coerce(value, hints[key], f"{prefix}{key}")
    return cls(**kwargs)
