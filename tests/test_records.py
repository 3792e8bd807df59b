"""The helpers every typed result writes and reads its JSON with."""

from dataclasses import dataclass

from reffuse.records import NOT_RECORDED, FlatRecord, as_json, as_tuple, interval_of, present_fields, records_of


@dataclass(frozen=True)
class Ratio:
    value: float
    unit: str | None = None
    value_interval_95: tuple | None = NOT_RECORDED

    def to_json(self) -> dict:
        return present_fields(self, kept_when_none=("value_interval_95",))

    @classmethod
    def from_json(cls, raw: dict) -> "Ratio":
        return cls(raw["value"], raw.get("unit"), interval_of(raw, "value_interval_95"))


def test_json_lists_read_as_tuples_and_write_back_as_lists():
    assert as_tuple([[5, 8], [9, 11]]) == ((5, 8), (9, 11)) and as_tuple(None) is None
    assert as_json({"groups": ((5, 8),), "ratio": Ratio(1.5)}) == {"groups": [[5, 8]], "ratio": {"value": 1.5}}


def test_fields_not_measured_are_left_out_and_an_interval_not_recorded_has_no_key():
    assert Ratio(1.5).to_json() == {"value": 1.5}                                 # absent: not recorded
    assert Ratio(1.5, "x", None).to_json() == {"value": 1.5, "unit": "x", "value_interval_95": None}  # too few
    for raw in ({"value": 1.5}, {"value": 1.5, "value_interval_95": None}, {"value": 1.5, "value_interval_95": [1, 2]}):
        assert Ratio.from_json(raw).to_json() == raw
    assert records_of(Ratio, {"decode": {"value": 2.0}}) == {"decode": Ratio(2.0)}


@dataclass(frozen=True)
class Step(FlatRecord):
    first: int
    tied: tuple[int, ...]


def test_a_flat_record_writes_its_fields_tuples_as_lists_and_reads_them_back():
    assert Step(3, (3, 5)).to_json() == {"first": 3, "tied": [3, 5]}
    assert Step.from_json({"first": 3, "tied": [3, 5]}) == Step(3, [3, 5])
