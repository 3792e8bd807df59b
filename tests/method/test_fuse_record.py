"""`reffuse fuse` records every choice in fuse.json: the record it returns writes that JSON, and reads it back."""

import json

import pytest

from reffuse.cli import main
from reffuse.method.pipeline import PROVENANCE_FILE, FuseRecord


@pytest.mark.parametrize("steps, planned", [
    (["--groups", "4-8"], False),
    (["--drop-attention-count", "2", "--plan", "auto", "--calibrate", "--calibration-tokens", "256"], True),
])
def test_fuse_json_reads_back_to_the_record_printed(tmp_path, capsys, steps, planned):
    out = tmp_path / "fused"
    assert main(["fuse", "--model", "tiny", *steps, "--scoring-tokens", "128", "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    raw = json.loads((out / PROVENANCE_FILE).read_text())
    record = FuseRecord.from_json(raw)
    assert raw == printed and record.to_json() == raw and list(record.to_json()) == list(raw)
    assert ("plan" in raw) == planned and (record.plan is not None) == planned
    assert (record.calibration is not None) == planned and (record.texts is not None) == planned
    assert record.layout[record.groups[0][0]].fused_from == tuple(range(record.groups[0][0], record.groups[0][1] + 1))
    if planned:
        assert record.attention_removal.joint_kl > 0 and len(record.attention_removal.blocks) == 2
        assert [fit.group for fit in record.calibration] == list(record.groups)


def test_fuse_prints_what_it_did(tmp_path, capsys):
    assert main(["fuse", "--model", "tiny", "--drop-attention", "2-3", "--groups", "2-4", "--out",
                 str(tmp_path / "fused")]) == 0
    printed = capsys.readouterr().out
    assert "attention removed: blocks 2-3 (given)" in printed and "fused groups (fold): 2-4" in printed
