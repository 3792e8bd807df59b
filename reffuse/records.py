"""What every typed result shares to write its JSON and read it back: JSON lists as tuples and back, records
inside records, 95% intervals, and fields left out where nothing was measured.

A result is a dataclass with a to_json() method and a from_json() classmethod (reffuse.speed.bench_result,
reffuse.experiments.demo_result, ...); these helpers keep each of those short and alike. Only the standard library
is used here, so that every layer of reffuse may use it.
"""

from __future__ import annotations

from dataclasses import asdict, fields

# The interval of a ratio recorded before intervals were kept: its key is absent from the JSON. It is empty, so
# that code asking whether there is an interval to print finds none.
NOT_RECORDED = ()


class FlatRecord:
    """A record whose fields are JSON values (numbers, strings, lists, None): it is written as its fields, tuples
    as lists, and read back from them."""

    def to_json(self) -> dict:
        return as_json(asdict(self))

    @classmethod
    def from_json(cls, raw: dict):
        return cls(**raw)


def as_json(value):
    """A value as JSON: a record by its to_json, a tuple as a list, and the items of a dict or a list likewise."""
    if hasattr(value, "to_json"):
        return value.to_json()
    if isinstance(value, dict):
        return {key: as_json(item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return [as_json(item) for item in value]
    return value


def as_tuple(raw) -> tuple | None:
    """A JSON list as a tuple, the lists inside it too ([[5, 8], [9, 11]] -> ((5, 8), (9, 11))); None stays None."""
    if raw is None:
        return None
    return tuple(as_tuple(item) if isinstance(item, list) else item for item in raw)


def interval_of(raw: dict, key: str) -> tuple | None:
    """The 95% interval under `key` of a JSON object: a pair, None (too few repeats gave none), or NOT_RECORDED
    where the key is absent."""
    return as_tuple(raw[key]) if key in raw else NOT_RECORDED


def records_of(record_type, raw: dict) -> dict:
    """A JSON object of records (name -> a record's JSON) read back, each by record_type.from_json."""
    return {name: record_type.from_json(item) for name, item in raw.items()}


def present_fields(record, kept_when_none=()) -> dict:
    """A record's fields as JSON (as_json), in their order, without those not measured: None (unless named in
    `kept_when_none`, whose JSON then holds a null) and intervals (fields named *interval_95) NOT_RECORDED."""
    out = {}
    for field in fields(record):
        value = getattr(record, field.name)
        not_measured = value is None and field.name not in kept_when_none
        not_recorded = field.name.endswith("interval_95") and value == NOT_RECORDED
        if not (not_measured or not_recorded):
            out[field.name] = as_json(value)
    return out
