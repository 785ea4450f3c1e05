"""Typed messages on the wire: frozen dataclasses checked strictly against plain JSON values.

A message type lists its fields with their types; a field without a default is required
(`X | None` without a default is required and may be null). `from_wire` refuses a missing
required key, a key the type does not have, and a value of the wrong type (a bool is not an
integer), naming the job kind and the key; `to_wire` gives the plain dict back. Values are
never quoted in errors: a parameter may be a secret.
"""

import dataclasses
import math
import types
import typing
from typing import Any, ClassVar, Self

# `from_wire` of a field's wire name when it differs from the field's (a key that is no identifier).
WIRE_NAME = "wire"


class ContractError(ValueError):
    """A value that does not match its message type; `where` names the kind and part, `key` the path."""

    def __init__(self, where: str, key: str | None, problem: str):
        super().__init__(f"{where}: {key}: {problem}" if key else f"{where}: {problem}")
        self.where = where
        self.key = key
        self.problem = problem


def message(cls):
    """Makes `cls` a message type: a frozen dataclass whose fields are given by keyword."""
    return dataclasses.dataclass(frozen=True, kw_only=True)(cls)


class Message:
    """Base of every message type. `KIND` and `PART` name it in errors ("tenant.dump params")."""

    KIND: ClassVar[str] = ""
    PART: ClassVar[str] = "message"

    @classmethod
    def where(cls) -> str:
        return f"{cls.KIND} {cls.PART}" if cls.KIND else cls.__name__

    @classmethod
    def from_wire(cls, raw: Any) -> Self:
        return _decode_message(cls, raw, cls.where(), "")

    def to_wire(self) -> dict:
        return {_wire_name(f): _encode(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def check(self) -> None:
        """Rules across fields, run by `from_wire`; a broken one raises through `refuse`."""

    def refuse(self, key: str, problem: str) -> typing.NoReturn:
        raise ContractError(self.where(), key, problem)


class Params(Message):
    PART = "params"


class Result(Message):
    PART = "result"


def _wire_name(field: dataclasses.Field) -> str:
    return field.metadata.get(WIRE_NAME, field.name)


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "an object"
    if isinstance(hint, type) and issubclass(hint, Message):
        return "an object"
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
            type(None): "null"}.get(hint, repr(hint))


def _decode(hint: Any, value: Any, where: str, path: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        if len(others) == 1:
            return _decode(others[0], value, where, path)
        for option in others:
            try:
                return _decode(option, value, where, path)
            except ContractError:
                continue
        raise ContractError(where, path, f"expected {_describe(hint)}, got {_json_type(value)}")
    if origin is list:
        if not isinstance(value, list):
            raise ContractError(where, path, f"expected a list, got {_json_type(value)}")
        return [_decode(args[0], item, where, f"{path}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ContractError(where, path, f"expected an object, got {_json_type(value)}")
        decoded = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ContractError(where, path, "object keys must be strings")
            decoded[key] = _decode(args[1], item, where, f"{path}[{key!r}]")
        return decoded
    if isinstance(hint, type) and issubclass(hint, Message):
        return _decode_message(hint, value, where, path)
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif hint is str:
        ok = isinstance(value, str)
    else:
        raise TypeError(f"{where}: {path}: no wire form for {hint!r}")
    if not ok:
        raise ContractError(where, path, f"expected {_describe(hint)}, got {_json_type(value)}")
    return value


def _decode_message(cls: type[Message], raw: Any, where: str, path: str) -> Message:
    if not isinstance(raw, dict):
        raise ContractError(where, path or None, f"expected an object, got {_json_type(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {_wire_name(f): f for f in dataclasses.fields(cls)}
    prefix = f"{path}." if path else ""
    for key in raw:
        if key not in fields:
            raise ContractError(where, f"{prefix}{key}" if isinstance(key, str) else repr(key), "unknown key")
    values = {}
    for name, field in fields.items():
        if name not in raw:
            if _required(field):
                raise ContractError(where, f"{prefix}{name}", "missing required key")
            continue
        values[field.name] = _decode(hints[field.name], raw[name], where, f"{prefix}{name}")
    decoded = cls(**values)
    try:
        decoded.check()
    except ContractError as exc:
        if not path:
            raise
        raise ContractError(where, f"{prefix}{exc.key}", exc.problem) from None
    return decoded


def _encode(value: Any) -> Any:
    if isinstance(value, Message):
        return value.to_wire()
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    return value


def wire_field(name: str, **kwargs) -> Any:
    """A field whose key on the wire is `name` (one that is not a Python identifier)."""
    return dataclasses.field(metadata={WIRE_NAME: name}, **kwargs)
