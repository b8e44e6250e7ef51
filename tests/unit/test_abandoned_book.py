"""spool/abandoned.py: the ids of commits given up, kept in a /dev/shm book past a kill of
the whole server (the real server's path: tests/integration/test_abandoned_commits.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from authrelay.spool.abandoned import ENTRIES, AbandonedBook


def test_a_killed_instances_ids_whose_files_remain_are_its_leftovers(tmp_path: Path) -> None:
    path = tmp_path / "book"
    book = AbandonedBook(path, 3)
    book.slot(1).keep("AAA1")
    book.slot(2).keep("BBB2")
    book.slot(0).keep("CCC3")
    # No close(): the processes were killed. The next start reads what is still queued.
    again = AbandonedBook(path, 2, exists=lambda qid: qid != "BBB2")
    assert again.leftovers == ["CCC3", "AAA1"]  # slot by slot
    # Kept again (slot 0): a second kill before they were dropped leaves them still.
    third = AbandonedBook(path, 2, exists=lambda qid: qid == "CCC3")
    assert third.leftovers == ["CCC3"]
    # A stop removes the book once no id it holds has its file.
    third.close(lambda qid: False)
    assert not path.exists()


def test_a_stop_keeps_the_book_while_a_file_remains(tmp_path: Path) -> None:
    path = tmp_path / "book"
    book = AbandonedBook(path, 2)
    book.slot(1).keep("AAA1")
    book.close(lambda qid: qid == "AAA1")
    assert AbandonedBook(path, 2).leftovers == ["AAA1"]


def test_a_full_slot_keeps_its_oldest_and_a_released_entry_is_free_again() -> None:
    """A slot keeps ids until they are released (their commit threads returned); full,
    a newer id is not kept: the oldest are the ones likely held in their fsyncs."""
    book = AbandonedBook(None, 2)
    slot = book.slot(1)
    entries = [slot.keep(f"Q{n}") for n in range(ENTRIES)]
    assert slot.keep("NEWER") == -1
    assert slot.ids() == [f"Q{n}" for n in range(ENTRIES)]
    slot.release(entries[5])
    assert slot.keep("NEWER") == entries[5]
    assert "Q5" not in slot.ids() and slot.ids()[-1] == "NEWER"
    assert book.take(1)[0] == "Q0"
    assert book.slot(1).ids() == [] and book.take(1) == []
    slot = book.slot(1)  # a replacement worker's: starts empty
    assert slot.keep("x" * 65) == -1  # no queue id of ours: not kept
    assert slot.ids() == []


def test_a_book_not_of_this_users_own_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "book"
    path.write_bytes(b"")
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError):
        AbandonedBook(path, 2)
