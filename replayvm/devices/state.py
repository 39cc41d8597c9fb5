"""Device state as plain data: the typed snapshots devices return, and their msgpack-ready form.

Each device's `state()` returns a frozen dataclass (`UartState`, `LapicState`, ...) whose fields
are plain values: int, bool, bytes, str, tuples of ints, None, or a nested state dataclass. Each
field's type carries its bounds (`U8`, `Blob(512)`, `Ints(24, U32)`, ...), because a state comes
back from checkpoint files and trace headers, which are untrusted input: `from_plain` checks
every field against them before a device ever sees the values, so `restore()` can trust its
argument.

    plain = to_plain(uart.state())                         # a dict msgpack can pack
    uart.restore(from_plain(UartState, msgpack.unpackb(msgpack.packb(plain))))

A bad value raises ValueError naming the field (`UartState.ier: ...`), never anything else.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Annotated, Any, TypeVar

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class IntRange:
    """An int field's inclusive bounds."""
    low: int
    high: int


@dataclasses.dataclass(frozen=True)
class MaxLen:
    """A bytes or tuple field's length bounds (inclusive)."""
    high: int
    low: int = 0


@dataclasses.dataclass(frozen=True)
class Items:
    """A tuple field's element type (an Annotated int type such as U8)."""
    item: Any


@dataclasses.dataclass(frozen=True)
class OneOf:
    """The values a str or int field may take."""
    values: tuple


def uint(bits: int) -> Any:
    """An unsigned int type of `bits` bits."""
    return Annotated[int, IntRange(0, (1 << bits) - 1)]


U8 = uint(8)
U16 = uint(16)
U32 = uint(32)
U64 = uint(64)
NS = uint(63)            # guest nanoseconds and counts derived from them (msgpack: fits int64)


def Blob(high: int, low: int = 0) -> Any:  # noqa: N802  (a type constructor, named like one)
    """Bytes of `low`..`high` bytes."""
    return Annotated[bytes, MaxLen(high, low)]


def Ints(length: int, item: Any, min_length: int | None = None) -> Any:  # noqa: N802
    """A tuple of exactly `length` ints of type `item` (or `min_length`..`length` of them)."""
    return Annotated[tuple, MaxLen(length, length if min_length is None else min_length), Items(item)]


def Choice(*values: Any) -> Any:  # noqa: N802
    """A str (or int) field taking one of `values`."""
    return Annotated[type(values[0]), OneOf(values)]


# ------------------------------------------------------------------------------ a device's state
def save_plain(device: Any) -> dict:
    """`device.state()` as plain data (for a checkpoint file or a trace header)."""
    return to_plain(device.state())


def restore_plain(device: Any, data: Any) -> None:
    """Restore `device` from what save_plain gave (read back from an untrusted file: checked
    against the device's `state_type` first; ValueError naming the field if it is bad)."""
    device.restore(from_plain(type(device).state_type, data))


# ------------------------------------------------------------------------------ to plain
def to_plain(state: Any) -> dict:
    """A state dataclass as a dict of plain values (tuples as lists, nested states as dicts)."""
    return {field.name: _plain_value(getattr(state, field.name)) for field in dataclasses.fields(state)}


def _plain_value(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_plain(value)
    if isinstance(value, tuple):
        return [_plain_value(item) for item in value]
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    return value


# ------------------------------------------------------------------------------ from plain
def from_plain(cls: type[T], data: Any) -> T:
    """The `cls` state that `to_plain` turned into `data`, every field checked (ValueError else).

    `data` must have exactly the fields of `cls`; each value must have the field's type (bool
    is not an int here, nor an int a bool) and lie within its bounds."""
    return _from_plain(cls, data, cls.__name__)


def _from_plain(cls: type[T], data: Any, where: str) -> T:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a map of fields, got {type(data).__name__}")
    hints = _hints(cls)
    names = [field.name for field in dataclasses.fields(cls)]   # type: ignore[arg-type]
    unknown = [key for key in data if key not in hints]
    if unknown:
        raise ValueError(f"{where}: unknown field {str(unknown[0])[:40]!r}")
    values = {}
    for name in names:
        if name not in data:
            raise ValueError(f"{where}.{name}: missing")
        values[name] = _check(hints[name], data[name], f"{where}.{name}")
    return cls(**values)


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _split(annotation: Any) -> tuple[Any, tuple]:
    """(base type, Annotated metadata) of a field annotation."""
    if typing.get_origin(annotation) is Annotated:
        base, *meta = typing.get_args(annotation)
        inner, inner_meta = _split(base)
        return inner, tuple(meta) + inner_meta
    return annotation, ()


def _check(annotation: Any, value: Any, where: str) -> Any:
    base, meta = _split(annotation)
    origin = typing.get_origin(base)
    if origin is typing.Union or origin is types.UnionType:
        options = [arg for arg in typing.get_args(base) if arg is not type(None)]
        if value is None and len(options) < len(typing.get_args(base)):
            return None
        if len(options) != 1:
            raise TypeError(f"{where}: unsupported annotation {annotation!r}")
        return _check(Annotated[(options[0], *meta)] if meta else options[0], value, where)
    if dataclasses.is_dataclass(base):
        return _from_plain(base, value, where)
    if base is bool:
        if type(value) is not bool:
            raise ValueError(f"{where}: expected a bool, got {_describe(value)}")
        return value
    if base is int:
        if type(value) is not int:
            raise ValueError(f"{where}: expected an int, got {_describe(value)}")
        _check_range(meta, value, where)
        _check_choice(meta, value, where)
        return value
    if base is str:
        if type(value) is not str:
            raise ValueError(f"{where}: expected a string, got {_describe(value)}")
        _check_choice(meta, value, where)
        return value
    if base is bytes:
        if not isinstance(value, (bytes, bytearray)):
            raise ValueError(f"{where}: expected bytes, got {_describe(value)}")
        _check_length(meta, len(value), where)
        return bytes(value)
    if base is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected an array, got {_describe(value)}")
        _check_length(meta, len(value), where)
        item = next((m.item for m in meta if isinstance(m, Items)), None)
        if item is None:
            raise TypeError(f"{where}: a tuple field needs Items(...)")
        return tuple(_check(item, element, f"{where}[{i}]") for i, element in enumerate(value))
    raise TypeError(f"{where}: unsupported annotation {annotation!r}")


def _check_range(meta: tuple, value: int, where: str) -> None:
    for m in meta:
        if isinstance(m, IntRange) and not m.low <= value <= m.high:
            raise ValueError(f"{where}: {value} is outside {m.low}..{m.high:#x}")


def _check_choice(meta: tuple, value: Any, where: str) -> None:
    for m in meta:
        if isinstance(m, OneOf) and value not in m.values:
            raise ValueError(f"{where}: {_short(value)} is not one of {', '.join(map(repr, m.values))}")


def _check_length(meta: tuple, length: int, where: str) -> None:
    for m in meta:
        if isinstance(m, MaxLen) and not m.low <= length <= m.high:
            expected = f"{m.high}" if m.low == m.high else f"{m.low}..{m.high}"
            raise ValueError(f"{where}: length {length}, expected {expected}")


def _short(value: Any) -> str:
    """A value for an error message, cut short (it came from an untrusted file)."""
    return repr(value[:40]) if isinstance(value, str) else repr(value)


def _describe(value: Any) -> str:
    return type(value).__name__
