"""Response messages in the proto3 JSON mapping, equal to `json_format.MessageToDict(message)`, made faster.

Why not MessageToDict itself: the gateway encodes every response on the server's event loop, and
MessageToDict spends most of its time making float32 values short, one by one (ToShortestFloat: the
nearest decimal of 6, then 7, 8, 9 significant digits until it reads back as the same float32, each try a
`str.format`, a `float()` and a `struct` round trip). A 128-token Decompose carries tens of thousands of
feature values, and encoding them took as long as the decomposition itself on a small CPU.

Here every float32 of a message tree is collected first and shortened in one vectorized pass (numpy,
`shortest_floats`) that computes the same nearest p-digit decimals exactly: x·10^k is rounded once in
float64 and the rounding to an integer is trusted only away from a .5 tie, so the integer is the exactly
rounded one and N/10^k (10^k exact for |k| <= 22) is the double `float('%.{p}g' % x)` gives. Values it
cannot decide that way (near a tie or a power of ten, tiny, huge, subnormal) take ToShortestFloat itself;
well-known types and extensions go to MessageToDict. tests/service/test_http_gateway.py compares the two.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.internal import type_checkers
from google.protobuf.message import Message

F = FieldDescriptor
_POW10 = np.array([float(10**i) for i in range(23)])  # exact doubles
_NAN, _INF, _NEG_INF = "NaN", "Infinity", "-Infinity"
Floats = list[tuple[Any, Any, bool]]
"""Where float32 values wait for `shortest_floats`: (container, key, repeated)."""


def to_json(message: Message) -> bytes:
    """A message in the proto3 JSON mapping, on one line (so one SSE `data:` field), UTF-8."""
    return json.dumps(message_to_dict(message), separators=(",", ":"), ensure_ascii=False).encode()


def message_to_dict(message: Message) -> dict[str, Any]:
    """`json_format.MessageToDict(message)` with its defaults (lowerCamelCase names, no default values)."""
    floats: Floats = []
    js = _message(message, floats)
    if floats:
        _fill(floats)
    return js


def _message(message: Message, floats: Floats) -> Any:
    if not _plain(message.DESCRIPTOR):
        return json_format.MessageToDict(message)  # a well-known type has a JSON form of its own
    js: dict[str, Any] = {}
    for field, value in message.ListFields():
        name, how, repeated, convert = _plan(field)
        if how is _PLAIN:
            js[name] = list(value) if repeated else value
        elif how is _MESSAGE:
            js[name] = [_message(v, floats) for v in value] if repeated else _message(value, floats)
        elif how is _FLOAT:
            js[name] = list(value) if repeated else value
            floats.append((js, name, repeated))
        elif how is _CONVERT:
            js[name] = [convert(v) for v in value] if repeated else convert(value)
        elif how is _MAP:
            js[name] = _map(field, value, floats)
        else:  # an extension: MessageToDict names it `[full.name]`
            return json_format.MessageToDict(message)
    return js


_PLAIN, _MESSAGE, _FLOAT, _CONVERT, _MAP, _EXTENSION = "plain", "message", "float", "convert", "map", "extension"


@cache
def _plan(field: FieldDescriptor) -> tuple[str, str, bool, Callable[[Any], Any] | None]:
    """(JSON name, how its values convert, repeated, the scalar conversion) of one field, worked out once."""
    convert = None
    if field.is_extension:
        how = _EXTENSION
    elif _is_map(field):
        how = _MAP
    elif field.cpp_type == F.CPPTYPE_MESSAGE:
        how = _MESSAGE
    elif field.cpp_type == F.CPPTYPE_FLOAT:
        how = _FLOAT
    else:
        convert = _scalar(field)
        how = _PLAIN if convert is None else _CONVERT
    return field.json_name, how, field.is_repeated, convert


def _map(field: FieldDescriptor, value: Any, floats: Floats) -> dict[str, Any]:
    value_field = field.message_type.fields_by_name["value"]
    out: dict[str, Any] = {}
    for key in value:
        label = ("true" if key else "false") if isinstance(key, bool) else str(key)
        item = value[key]
        if value_field.cpp_type == F.CPPTYPE_MESSAGE:
            out[label] = _message(item, floats)
        elif value_field.cpp_type == F.CPPTYPE_FLOAT:
            out[label] = item
            floats.append((out, label, False))
        else:
            convert = _scalar(value_field)
            out[label] = item if convert is None else convert(item)
    return out


@cache
def _plain(descriptor: Descriptor) -> bool:
    return descriptor.file.package != "google.protobuf"


@cache
def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


@cache
def _scalar(field: FieldDescriptor) -> Callable[[Any], Any] | None:
    """The conversion of one non-float scalar value, or None when the value is its own JSON."""
    kind = field.cpp_type
    if kind == F.CPPTYPE_ENUM:
        return _enum(field.enum_type)
    if kind == F.CPPTYPE_STRING and field.type == F.TYPE_BYTES:
        return lambda v: base64.b64encode(v).decode("utf-8")
    if kind in (F.CPPTYPE_INT64, F.CPPTYPE_UINT64):
        return str
    if kind == F.CPPTYPE_DOUBLE:
        return _double
    if kind == F.CPPTYPE_BOOL:
        return bool
    return None  # int32, uint32, string


@cache
def _enum(enum: EnumDescriptor) -> Callable[[int], Any]:
    if enum.full_name == "google.protobuf.NullValue":
        return lambda v: None
    printer = json_format._Printer()  # private, for the enum values' JSON name option exactly as MessageToDict reads it
    names: dict[int, str] = {}
    for value in enum.values:
        option = printer._GetJsonEnumValueOption(value)
        names[value.number] = option.string if option is not None else value.name

    def convert(number: int) -> Any:
        if number in names:
            return names[number]
        if enum.is_closed:
            raise json_format.SerializeToJsonError("Enum field contains an integer value which can not mapped to "
                                                   "an enum value.")
        return number
    return convert


def _double(value: float) -> Any:
    if math.isfinite(value):
        return value
    return _NAN if math.isnan(value) else (_INF if value > 0 else _NEG_INF)


def _fill(floats: Floats) -> None:
    """Replace every collected float32 (or list of them) with its JSON value, all shortened at once."""
    values: list[float] = []
    for container, key, repeated in floats:
        if repeated:
            values.extend(container[key])
        else:
            values.append(container[key])
    short = shortest_floats(values)
    at = 0
    for container, key, repeated in floats:
        if repeated:
            n = len(container[key])
            container[key] = short[at:at + n]
            at += n
        else:
            container[key] = short[at]
            at += 1


def shortest_floats(values: list[float]) -> list[Any]:
    """`ToShortestFloat` of each float32 value (as MessageToDict writes floats), "NaN"/"Infinity"/"-Infinity"."""
    given = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(given)
    x = np.where(finite, given, 0.0)
    x32 = x.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):  # log10(0) = -inf, then -inf - -inf
        lg = np.log10(np.abs(x))
        exponent = np.floor(lg)
        # decimal exponent sure (not within 1e-9 of a power of ten) and every 10^k below exact (|k| <= 22, p 6..9)
        pending = finite & (x != 0) & (exponent >= -14) & (exponent <= 27) & (np.abs(lg - np.rint(lg)) > 1e-9)
    slow = finite & (x != 0) & ~pending
    out = x  # zeros stay 0.0 / -0.0, as ToShortestFloat gives
    safe_exponent = np.where(pending, exponent, 0.0)
    for digits in range(6, 10):
        k = digits - 1 - safe_exponent
        scale = _POW10[np.abs(k).astype(np.int64)]
        up = k >= 0
        y = np.where(up, x * scale, x / scale)
        near_tie = np.abs(np.abs(y - np.floor(y)) - 0.5) <= np.abs(y) * 2.0**-50
        slow |= pending & near_tie
        pending &= ~near_tie
        n = np.rint(y)
        decimal = np.where(up, n / scale, n * scale)
        done = pending & (decimal.astype(np.float32) == x32)
        out = np.where(done, decimal, out)
        pending &= ~done
    slow |= pending  # none: nine digits always read back
    result: list[Any] = out.tolist()
    for i in np.flatnonzero(slow | ~finite).tolist():
        value = values[i]
        if math.isnan(value):
            result[i] = _NAN
        elif math.isinf(value):
            result[i] = _INF if value > 0 else _NEG_INF
        else:
            result[i] = type_checkers.ToShortestFloat(value)
    return result
