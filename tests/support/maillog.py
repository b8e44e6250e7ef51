"""`ListLog`: the real MailLog (same lines, same formatting) kept in a list, for tests
that drive the scheduler or courier in-process and assert on the operator's audit trail."""

from __future__ import annotations

from authrelay.maillog import MailLog


class ListLog(MailLog):
    def __init__(self) -> None:
        super().__init__("stdout")
        self.lines: list[str] = []

    def _emit(self, line: str) -> None:
        self.lines.append(line)

    def grep(self, *needles: str) -> list[str]:
        """The lines containing every one of `needles`."""
        return [ln for ln in self.lines if all(n in ln for n in needles)]
