"""The in-flight journal's lines (scheduler/inflight.py): the hand-built encoding is the
documented JSON, byte for byte, for any recipient text, and a journal read back names
exactly the attempts begun and not ended."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from authrelay.scheduler import inflight
from authrelay.scheduler.inflight import InflightJournal, Leftover, Owed, _begin_line


def _o(rcpt: str) -> Owed:
    """`rcpt` owed a success DSN, with what the next hop said (inflight.Owed)."""
    return Owed(rcpt, "mx.x.test [192.0.2.1]:25", "250 2.0.0 Ok: \"queued\"\r\n", 1_700_000_000)


def _said(*rcpts: str) -> dict[str, Owed]:
    return {r: _o(r) for r in rcpts}


def _w(*rcpts: str) -> dict[str, list[object]]:
    """The `"w"` of a line owing them a success DSN, as JSON reads it."""
    return {r: list(_o(r)[1:]) for r in rcpts}


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
    j.start()
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
    assert InflightJournal(tmp_path).leftovers() == [
        Leftover("Q2", ["b@x.test", "c\"@x.test"], [], [], {})]


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
    j.start()
    t1 = j.begin("Q1", ["a@x.test"])
    assert j.written(10)
    (tmp_path / "inflight.log").rmdir()  # room again
    t2 = j.begin("Q2", ["b@x.test"])
    j.end(t2)
    j.begin("Q3", ["c@x.test"])
    assert j.written(10)
    assert t1 != t2
    assert sorted(InflightJournal(tmp_path).leftovers()) == [
        ("Q1", ["a@x.test"], [], [], {}, False, False),
        ("Q3", ["c@x.test"], [], [], {}, False, False)]


def test_delivered_recipients_are_left_over_until_their_end(tmp_path: Path) -> None:
    """The next hop's 2xx recorded before the outcome is saved (the removal of a delivered
    message is batched, 5 ms later): every recipient of an attempt is its end line
    `{"e": N, "d": 1}` (no line more than before: end() then writes nothing), some of
    them a `{"d": N, "r": [...]}` line; a crash before the save leaves them over, named
    delivered. On the old journal there was no such record: a kill in that window
    delivered the message again."""
    j = InflightJournal(tmp_path)
    j.start()
    t1 = j.begin("Q1", ["a@x.test"])
    t2 = j.begin("Q2", ["b@x.test", "c@x.test"])
    t3 = j.begin("Q3", ["d@x.test"])
    j.delivered([(t1, ["a@x.test"], True, [])])
    j.delivered([(t2, ["c@x.test"], False, [_o("c@x.test")])])
    j.delivered([(t3, ["d@x.test"], True, [_o("d@x.test")])])
    j.end(t3)  # removed: nothing more to write
    assert j.written(10)
    j.close()
    lines = [json.loads(x) for x in (tmp_path / "inflight.log").read_bytes().splitlines()]
    assert lines[3:] == [{"e": t1, "d": 1}, {"d": t2, "r": ["c@x.test"], "n": ["c@x.test"],
                          "w": _w("c@x.test")},
                         {"e": t3, "d": 1, "n": ["d@x.test"], "w": _w("d@x.test")}]
    assert InflightJournal(tmp_path).leftovers() == [
        Leftover("Q1", ["a@x.test"], ["a@x.test"], [], {}),
        Leftover("Q3", ["d@x.test"], ["d@x.test"], ["d@x.test"], _said("d@x.test")),
        Leftover("Q2", ["b@x.test", "c@x.test"], ["c@x.test"], ["c@x.test"], _said("c@x.test"))]


def test_a_delivered_line_never_names_a_recipient_the_attempt_had_not(tmp_path: Path) -> None:
    """The recovery removes on the journal's word: a `d` line counts only for recipients
    its own attempt began, and not at all without a begin line (torn, compacted away)."""
    (tmp_path / "inflight.log").write_bytes(
        b'{"b":1,"q":"Q1","r":["a@x.test"]}\n'
        b'{"d":1,"r":["a@x.test","z@x.test"]}\n'
        b'{"e":7,"d":1}\n{"d":8,"r":["y@x.test"]}\n'
        b'{"b":2,"q":"Q2","r":["b@x.te')  # torn: the process died writing it
    assert InflightJournal(tmp_path).leftovers() == [
        Leftover("Q1", ["a@x.test"], ["a@x.test"], [], {})]


def test_a_compaction_keeps_what_was_delivered(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A journal past COMPACT_AT (0 here: at every line) is rewritten with its live
    attempts: their delivered recipients too, else a crash after the compaction
    delivered them again, and those owed a success DSN, else it was lost."""
    monkeypatch.setattr(inflight, "COMPACT_AT", 0, raising=False)
    j = InflightJournal(tmp_path)
    j.start()
    t1 = j.begin("Q1", ["a@x.test", "b@x.test"])
    j.delivered([(t1, ["a@x.test"], False, [])])
    t2 = j.begin("Q2", ["c@x.test", "e@x.test"])
    j.delivered([(t2, ["c@x.test", "e@x.test"], True, [_o("e@x.test")])])
    assert j.written(10)  # (one rewrite asked at a time: the one asked before is done)
    j.begin("Q3", ["d@x.test"])  # compacts: the file is only the live attempts now
    assert j.written(10)
    j.close()
    assert b'"e"' not in (tmp_path / "inflight.log").read_bytes()  # rewritten
    assert InflightJournal(tmp_path).leftovers() == [
        Leftover("Q1", ["a@x.test", "b@x.test"], ["a@x.test"], [], {}),
        Leftover("Q2", ["c@x.test", "e@x.test"], ["c@x.test", "e@x.test"], ["e@x.test"],
                 _said("e@x.test")),
        Leftover("Q3", ["d@x.test"], [], [], {})]


def test_a_journal_enabled_again_has_what_was_delivered_while_it_was_off(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Disabled by an I/O error, the journal loses the lines given meanwhile (a crash
    then delivers those messages again, as before); once it is enabled again it is
    rewritten with every live attempt, what was delivered meanwhile with it."""
    monkeypatch.setattr(inflight, "RETRY_AFTER", 0.0, raising=False)
    (tmp_path / "inflight.log").mkdir()
    j = InflightJournal(tmp_path)
    j.start()  # disabled: its name is a directory
    t1 = j.begin("Q1", ["a@x.test"])
    j.delivered([(t1, ["a@x.test"], True, [])])
    assert j.written(10)
    (tmp_path / "inflight.log").rmdir()  # room again
    j.begin("Q2", ["b@x.test"])
    assert j.written(10)
    j.close()
    assert InflightJournal(tmp_path).leftovers() == [
        Leftover("Q1", ["a@x.test"], ["a@x.test"], [], {}),
        Leftover("Q2", ["b@x.test"], [], [], {})]


def test_leftovers_leave_the_file_until_start(tmp_path: Path) -> None:
    """leftovers() truncated the journal as it read it, before the scheduler had applied
    them: a crash during that start lost what they said. Now only start() truncates."""
    j = InflightJournal(tmp_path)
    j.start()
    j.delivered([(j.begin("Q1", ["a@x.test"]), ["a@x.test"], True, [])])
    assert j.written(10)
    j.close()
    again = InflightJournal(tmp_path)
    assert again.leftovers() == InflightJournal(tmp_path).leftovers() != []
    again.start()
    assert InflightJournal(tmp_path).leftovers() == []



def test_a_disabled_journal_copies_its_live_attempts_once_per_retry(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # While disabled (a full disk) every begin and end handed the writer thread a copy
    # of all live attempts, though the thread only used one once the retry was due:
    # O(live) per attempt for RETRY_AFTER (issue 22). Now one copy when the retry is
    # due, and the journal it rewrites still holds every live attempt, those begun while
    # it was off included; a line after it is appended as usual.
    snapshots: list[int] = []
    retry = InflightJournal._retry

    def counted(self: InflightJournal, live: list[tuple[int, inflight._Live]]
                ) -> None:
        snapshots.append(len(live))
        retry(self, live)

    monkeypatch.setattr(InflightJournal, "_retry", counted)
    monkeypatch.setattr(inflight, "RETRY_AFTER", 3600.0, raising=False)
    (tmp_path / "inflight.log").mkdir()
    j = InflightJournal(tmp_path)
    j.start()  # disabled: its name is a directory
    tokens = [j.begin(f"Q{i}", [f"r{i}@x.test"]) for i in range(200)]
    for t in tokens[::2]:
        j.end(t)
    assert j.written(10)
    assert snapshots == []  # not due: nothing copied, nothing rewritten
    (tmp_path / "inflight.log").rmdir()  # room again
    monkeypatch.setattr(inflight, "RETRY_AFTER", 0.0, raising=False)  # and due
    j.end(tokens[1])
    j.begin("QA", ["a@x.test"])
    j.end(tokens[3])
    assert j.written(10)
    assert snapshots == [99]  # one copy: the live ones at the first line once due
    j.close()
    want = [Leftover(f"Q{i}", [f"r{i}@x.test"], [], [], {}) for i in range(5, 200, 2)]
    assert InflightJournal(tmp_path).leftovers() == want + [
        Leftover("QA", ["a@x.test"], [], [], {})]


def test_a_journal_past_its_size_is_compacted_each_time_it_grows_past_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The rewrite with only the live attempts is asked for once per crossing of
    # COMPACT_AT (not with every line while the writer has not yet done it), and again
    # at the next crossing: the file stays small and names exactly the live attempts.
    monkeypatch.setattr(inflight, "COMPACT_AT", 300, raising=False)
    j = InflightJournal(tmp_path)
    j.start()
    keep = [j.begin("K1", ["k1@x.test"]), j.begin("K2", ["k2@x.test"])]
    biggest = 0
    for i in range(300):
        j.end(j.begin(f"Q{i}", [f"r{i}@x.test"]))
        if i % 10 == 0:
            assert j.written(10)
            biggest = max(biggest, (tmp_path / "inflight.log").stat().st_size)
    j.end(keep[0])
    assert j.written(10)
    j.close()
    assert biggest < 300 + 10 * 60  # compacted again and again (each pair ~60 bytes)
    assert InflightJournal(tmp_path).leftovers() == [Leftover("K2", ["k2@x.test"], [], [], {})]


def test_a_cut_attempt_leaves_only_what_its_transactions_delivered(tmp_path: Path) -> None:
    """Each transaction's 2xx is journaled as it comes (the courier's taken), once: the
    attempt's own results later add no line for them. A stop's cut (`{"e": N, "c": 1}`)
    leaves the delivered ones (its other recipients are not in doubt: the stop's lines
    said so); a cut with none delivered leaves nothing."""
    j = InflightJournal(tmp_path)
    j.start()
    t1 = j.begin("Q1", ["a@x.test", "b@x.test", "c@x.test"])
    t2 = j.begin("Q2", ["d@x.test"])
    j.delivered([(t1, ["a@x.test"], False, [_o("a@x.test")])])  # the first transaction
    j.delivered([(t1, ["a@x.test"], False, [_o("a@x.test")])])  # (said again: no line)
    j.cut(t1)
    j.cut(t2)
    assert j.written(10)
    j.close()
    lines = [json.loads(x) for x in (tmp_path / "inflight.log").read_bytes().splitlines()]
    assert lines[2:] == [{"d": t1, "r": ["a@x.test"], "n": ["a@x.test"], "w": _w("a@x.test")},
                         {"e": t1, "c": 1}, {"e": t2}]
    assert InflightJournal(tmp_path).leftovers() == [
        Leftover("Q1", ["a@x.test"], ["a@x.test"], ["a@x.test"], _said("a@x.test"), True)]


def test_what_a_success_dsn_says_is_journaled_with_its_recipients(tmp_path: Path) -> None:
    """The start's success DSN after a crash had no Remote-MTA nor Diagnostic-Code (the
    reply was not journaled). Now the line owing it says both and when, each recipient's
    (JSON: a reply's CR LF, quotes, separators cannot end the line); a journal of the
    older version ("n" alone) still reads, saying nothing of them."""
    hostile = Owed("b@x.test", "mx.x.test [192.0.2.1]:25",
                   "250 2.0.0 Ok\r\n{\"e\":1}\u2028\\x" + "y" * 16_000, 1_700_000_123)
    j = InflightJournal(tmp_path)
    j.start()
    t1 = j.begin("Q1", ["a@x.test", "b@x.test"])
    j.delivered([(t1, ["a@x.test", "b@x.test"], True, [hostile])])
    assert j.written(10)
    j.close()
    raw = (tmp_path / "inflight.log").read_bytes()
    assert raw.count(b"\n") == 2 and raw.isascii()
    assert InflightJournal(tmp_path).leftovers() == [
        Leftover("Q1", ["a@x.test", "b@x.test"], ["a@x.test", "b@x.test"], ["b@x.test"],
                 {"b@x.test": hostile})]
    (tmp_path / "inflight.log").write_bytes(
        b'{"b":1,"q":"Q1","r":["a@x.test"]}\n{"e":1,"d":1,"n":["a@x.test"]}\n')
    assert InflightJournal(tmp_path).leftovers() == [
        Leftover("Q1", ["a@x.test"], ["a@x.test"], ["a@x.test"], {})]


def test_a_notices_mark_is_reached_once_its_s_line_is_written(tmp_path: Path) -> None:
    """notified() returns the mark said() waits for: its `{"s": N}` line written (the
    scheduler begins no delivery of that success notice before); 0 when it wrote none."""
    j = InflightJournal(tmp_path)
    j.start()
    t1 = j.begin("Q1", ["a@x.test"])
    assert j.notified([t1]) == 0  # owed nothing: no line, nothing to wait for
    j.delivered([(t1, ["a@x.test"], True, [_o("a@x.test")])])
    mark = j.notified([t1])
    assert mark > t1
    assert j.written(10)
    assert j.said(mark) is None
    j.close()
    lines = [json.loads(x) for x in (tmp_path / "inflight.log").read_bytes().splitlines()]
    assert lines[-1] == {"s": t1}
    assert InflightJournal(tmp_path).leftovers() == [
        Leftover("Q1", ["a@x.test"], ["a@x.test"], [], {"a@x.test": _o("a@x.test")})]


def test_ids_deleted_while_no_scheduler_runs_are_read_back_until_the_start(
        tmp_path: Path) -> None:
    """record_deleted (an admin's offline `queue delete`) appends `{"x": ID}` lines after
    the dead run's; leftovers() reads them into .deleted (the recovery queues no success
    notice among them again) and the run's own lines as before; start() forgets them."""
    j = InflightJournal(tmp_path)
    j.start()
    j.begin("Q1", ["a@x.test"])
    assert j.written(10)
    j.close()
    inflight.record_deleted(tmp_path, ["N1", "N\"2"])
    inflight.record_deleted(tmp_path, [])
    again = InflightJournal(tmp_path)
    assert again.leftovers() == [Leftover("Q1", ["a@x.test"], [], [], {})]
    assert again.deleted == {"N1", "N\"2"}
    again.start()
    assert again.deleted == set()
    assert again.leftovers() == []


def test_a_logged_mark_is_read_back_and_kept_by_a_compaction(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`logged(tokens)` (the maillog's writer wrote their stat=Sent lines): `{"l": [N]}`,
    read back as Leftover.logged, so the start after a crash writes `recorded=` for them
    and their stat=Sent line for the others; a compaction (COMPACT_AT 0: at every line)
    keeps the marks of the live attempts, else the start wrote a second stat=Sent."""
    monkeypatch.setattr(inflight, "COMPACT_AT", 0, raising=False)
    j = InflightJournal(tmp_path)
    j.start()
    t1 = j.begin("Q1", ["a@x.test"])
    t2 = j.begin("Q2", ["b@x.test"])
    j.delivered([(t1, ["a@x.test"], True, []), (t2, ["b@x.test"], True, [])])
    j.logged([t1])
    assert j.written(10)
    assert {"l": [t1]} in [json.loads(x) for x in
                           (tmp_path / "inflight.log").read_bytes().splitlines()]
    j.begin("Q3", ["c@x.test"])  # compacts
    assert j.written(10)
    j.close()
    assert [(x.qid, x.logged) for x in InflightJournal(tmp_path).leftovers()] == [
        ("Q1", True), ("Q2", False), ("Q3", False)]
