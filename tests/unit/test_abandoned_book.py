"""spool/abandoned.py: the ids of commits given up, kept in a /dev/shm book past a kill of
the whole server (the real server's path: tests/integration/test_abandoned_commits.py)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from support import tmpfs

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


def test_a_full_dev_shm_at_the_start_still_hands_over_the_killed_instances_ids(
        tmp_path: Path) -> None:
    """A start with more slots than the killed instance's book (workers raised) on a full
    /dev/shm: the book's old entries were cleared before its new pages were taken, and
    that failure lost the ids read: the files the killed instance gave up delivered
    (the duplicates the book is for). Now they are read all the same; this instance's
    ids go in anonymous memory (`unkept`) and the book stays for the next start."""
    with tmpfs.mounted(tmp_path / "shm", "256k") as shm:
        path = shm / "book"
        AbandonedBook(path, 2).slot(1).keep("AAA1")  # killed: no close()
        with open(shm / "filler", "wb", buffering=0) as f:  # /dev/shm full
            with pytest.raises(OSError) as full:
                while True:
                    f.write(b"\0" * 4096)
            assert full.value.errno == errno.ENOSPC
        book = AbandonedBook(path, 3, exists=lambda qid: True)
        assert book.leftovers == ["AAA1"]
        assert book.unkept is not None and book.unkept.errno == errno.ENOSPC
        assert book.unkept.filename == str(path)
        book.slot(2).keep("BBB2")  # (in anonymous memory: the file as it was)
        assert book.slot(2).ids() == ["BBB2"]
        book.close(lambda qid: False)
        assert AbandonedBook(path, 2, exists=lambda qid: True).leftovers == ["AAA1"]
        # The same slots again (the usual restart) take no new room: the book is used.
        again = AbandonedBook(path, 2, exists=lambda qid: False)
        assert again.unkept is None and again.leftovers == []
