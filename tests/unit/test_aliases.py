"""aliases.expand: the rewriting of local names ([aliases], aliases_file)."""

from __future__ import annotations

from pathlib import Path

import pytest

from authrelay import aliases
from authrelay.config import from_dict


@pytest.mark.timeout(60)
def test_groups_that_name_each_other_are_expanded_once_each(tmp_path: Path) -> None:
    """Twelve lists that each include all the others (an /etc/aliases of teams that
    cross-reference, or a loop by mistake): the walk followed every path of up to 10
    names (11^9 of them), so one bounce, or one message to postmaster@hostname, held the
    event loop, every session and delivery, for hours. Each name is expanded once now."""
    names = [f"team{i}" for i in range(12)]
    lines = [f"{n}: {n}-lead@example.org, " + ", ".join(m for m in names if m != n)
             for n in names]
    (tmp_path / "aliases").write_text("\n".join(lines) + "\n")
    cfg = from_dict({"hostname": "relay.test", "aliases_file": str(tmp_path / "aliases"),
                     "aliases": {"postmaster": "team0"}})
    got = aliases.expand(cfg, ["postmaster@relay.test"])
    assert sorted(a for a in got if a.endswith("@example.org")) == sorted(
        f"{n}-lead@example.org" for n in names)
    assert len(got) == len({a.lower() for a in got})


def test_a_loop_keeps_the_address_and_a_diamond_delivers_once() -> None:
    cfg = from_dict({"hostname": "relay.test", "aliases": {
        "a": ["b", "x@example.org"], "b": ["a", "y@example.org"],
        "all": ["left", "right"], "left": "c", "right": "c", "c": "z@example.org"}})
    assert aliases.expand(cfg, ["a"]) == ["a@relay.test", "y@example.org", "x@example.org"]
    assert aliases.expand(cfg, ["all@relay.test"]) == ["z@example.org"]
