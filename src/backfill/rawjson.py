"""JSON read only as deep as it is used: a value nobody looks into stays its bytes (msgspec.Raw), checked to be
well-formed JSON but never parsed, and is written out again as it came.

An embeddings answer is mostly floats (768 a line for a model like bge-base): parsing each into a Python float and
formatting it back was most of what splitting a coalesced answer cost (BENCHMARKS.md, issue 17).
"""

from __future__ import annotations

from typing import Any

import msgspec

Raw = msgspec.Raw
DecodeError = msgspec.DecodeError  # malformed JSON, or (msgspec.ValidationError) not of the shape asked for

_OBJECT = msgspec.json.Decoder(dict[str, msgspec.Raw])
_OBJECTS = msgspec.json.Decoder(list[dict[str, msgspec.Raw]])
_VALUES = msgspec.json.Decoder(list[msgspec.Raw])
_ENCODER = msgspec.json.Encoder()


def read_object(data: bytes) -> dict[str, Raw] | None:
    """A JSON object's members, their values unparsed; None when `data` is not one well-formed JSON object in
    UTF-8."""
    if not data.isascii():  # msgspec checks the UTF-8 of what it parses, not of what it skips
        try:
            data.decode()
        except UnicodeDecodeError:
            return None
    try:
        return _OBJECT.decode(data)
    except msgspec.DecodeError:
        return None


def read_objects(data: Raw) -> list[dict[str, Raw]]:
    """A JSON array of objects, their members' values unparsed. Raises DecodeError."""
    return _OBJECTS.decode(data)


def read_values(data: Raw) -> list[Raw]:
    """A JSON array's elements, unparsed. Raises DecodeError."""
    return _VALUES.decode(data)


def parse(data: bytes | Raw) -> Any:
    """A value parsed in full. Raises DecodeError."""
    return msgspec.json.decode(data)


def encode(value: Any) -> bytes:
    """Compact JSON; a Raw value is written as its bytes."""
    return _ENCODER.encode(value)
