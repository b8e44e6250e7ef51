"""The in-flight journal's lines (scheduler/inflight.py): the hand-built encoding is the
documented JSON, byte for byte, for any recipient text, and a journal read back names
exactly the attempts begun and not ended."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from authrelay.scheduler import inflight
from authrelay.scheduler.inflight import InflightJournal, _begin_line


@pytest.mark.parametrize("rcpts", [
    ["c@d.test"], [], ["a@b", "é\"x@y", "\u2028z\\", "", "\x00\r\n"],
])
def test_begin_line_is_compact_json(rcpts: list[str]) -> None:
    want = json.dumps({"b": 42, "q": "2N67QDB988DMY4DJ0", "r": rcpts},
                      separators=(",", ":")).encode() + b"\n"
    assert _begin_line(42, "2N67QDB988DMY4DJ0", rcpts) == want


def test_journal_round_trip(tmp_path: Path) -> None:
    j = InflightJournal(tmp_path)
    assert j.leftovers() == []
    t1 = j.begin("Q1", ["a@x.test"])
    t2 = j.begin("Q2", ["b@x.test", "c\"@x.test"])
    j.end(t1)
    assert j.written(10)  # (by the journal's thread)
    j.close()
    lines = (tmp_path / "inflight.log").read_bytes().splitlines()
    assert [json.loads(x) for x in lines] == [
        {"b": t1, "q": "Q1", "r": ["a@x.test"]},
        {"b": t2, "q": "Q2", "r": ["b@x.test", "c\"@x.test"]},
        {"e": t1}]
    assert InflightJournal(tmp_path).leftovers() == [("Q2", ["b@x.test", "c\"@x.test"])]


def test_journal_disabled_by_an_io_error_comes_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An I/O error (a full disk; here the journal's name taken by a directory) disabled
    # the journal for the life of the process: after the disk had room again, a crash
    # named no attempt. Now it is tried again RETRY_AFTER later (0 here) and holds every
    # attempt still live, those begun while it was off too.
    monkeypatch.setattr(inflight, "RETRY_AFTER", 0.0, raising=False)
    (tmp_path / "inflight.log").mkdir()
    j = InflightJournal(tmp_path)
    assert j.leftovers() == []  # cannot read nor open it: disabled
    t1 = j.begin("Q1", ["a@x.test"])
    assert j.written(10)
    (tmp_path / "inflight.log").rmdir()  # room again
    t2 = j.begin("Q2", ["b@x.test"])
    j.end(t2)
    j.begin("Q3", ["c@x.test"])
    assert j.written(10)
    assert t1 != t2
    assert sorted(InflightJournal(tmp_path).leftovers()) == [
        ("Q1", ["a@x.test"]), ("Q3", ["c@x.test"])]
