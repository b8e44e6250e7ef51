"""types.DeliveryResult: the courier's per-recipient outcome."""

from __future__ import annotations

import dataclasses

import pytest

from authrelay.types import MAX_TEXT, DeliveryResult

# A value for every field, none of them the default (a field added to DeliveryResult
# without one here fails the first assertion below).
EVERY_FIELD = {"code": 250, "enhanced": "2.1.5", "text": "ok, queued", "permanent": True,
               "remote": "mx.example.test [192.0.2.1]:25", "dsn_passed": True,
               "tls": "verified", "tls_policy": "dane", "recipient_refused": True,
               "unanswered": True}


@pytest.mark.parametrize("text", ["ok, queued", "x" * (MAX_TEXT + 50)])
@pytest.mark.parametrize("dsn_passed", [False, True])
def test_delivery_result_stamped_keeps_every_field(text: str, dsn_passed: bool) -> None:
    """stamped() builds its copy directly (the courier's path, issue 22): equal to
    dataclasses.replace() with the same three changes, every other field kept."""
    assert {f.name for f in dataclasses.fields(DeliveryResult)} == set(EVERY_FIELD)
    for off in [None, *EVERY_FIELD]:  # each field at its default in turn, too
        kw = dict(EVERY_FIELD, text=text)
        if off is not None and off not in ("code", "enhanced", "text", "permanent"):
            kw.pop(off)
        res = DeliveryResult(**kw)  # type: ignore[arg-type]
        got = res.stamped("anonymous", "may", dsn_passed)
        assert got == dataclasses.replace(res, tls="anonymous", tls_policy="may",
                                          dsn_passed=dsn_passed)
        assert got.text == res.text  # truncated once, not again
