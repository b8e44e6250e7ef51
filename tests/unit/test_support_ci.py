"""The rule every environment-dependent test relies on (tests/support/ci.py): a missing
tool or privilege fails the test under CI=true and skips it elsewhere, naming why."""

from __future__ import annotations

import pytest
from _pytest.outcomes import Failed, Skipped
from support import ci


def test_met_requirement_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    for in_ci in (True, False):
        monkeypatch.setattr(ci, "IN_CI", in_ci)
        ci.require(True, "never shown")


def test_missing_under_ci_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ci, "IN_CI", True)
    why = r"saslauthd-no-such-binary not installed \(apt-get install sasl2-bin\)"
    with pytest.raises(Failed, match=why):
        ci.require_tool("saslauthd-no-such-binary", "sasl2-bin")


def test_missing_elsewhere_skips(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ci, "IN_CI", False)
    with pytest.raises(Skipped, match="dovecot-no-such-binary not installed"):
        ci.require_tool("dovecot-no-such-binary", "dovecot-core")


@pytest.mark.parametrize("value, expect", [("true", True), ("1", True), ("YES", True),
                                            ("", False), ("false", False), ("0", False)])
def test_ci_variable(value: str, expect: bool) -> None:
    assert ci.is_ci({"CI": value}) is expect
    assert ci.is_ci({}) is False
