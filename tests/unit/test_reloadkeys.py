"""Every config key is classified: applied by SIGHUP, or named as needing a restart.

The key list is generated from the config dataclasses, so a key added to config.py fails
here until reloadkeys.py says which it is.
"""

from __future__ import annotations

import pytest

from authrelay import reloadkeys
from authrelay.config import Config, from_dict

PATHS = reloadkeys.key_paths()


def test_the_walk_finds_nested_and_array_keys() -> None:
    for p in ("hostname", "relay.smart_host", "listen[].address", "tls.cert",
              "limits.shared", "auth.dsn"):
        assert p in PATHS
    assert "source" not in PATHS


@pytest.mark.parametrize("path", PATHS)
def test_every_key_is_classified_once(path: str) -> None:
    assert (path in reloadkeys.RELOADABLE) != (path in reloadkeys.RESTART_ONLY), path


def test_no_stale_names() -> None:
    assert set(reloadkeys.RELOADABLE | reloadkeys.RESTART_ONLY) <= set(PATHS)


@pytest.mark.parametrize("path", PATHS)
def test_a_change_is_named_exactly_when_it_needs_a_restart(path: str) -> None:
    running = Config()
    unit = reloadkeys._top(path)
    new = reloadkeys._set(running, unit, object())  # any different value
    changes = reloadkeys.restart_changes(running, new)
    if reloadkeys.is_reloadable(path):
        assert changes == []
        assert reloadkeys._get(reloadkeys.keep_running(running, new), unit) is \
            reloadkeys._get(new, unit)
    else:
        assert changes == [unit]
        assert reloadkeys._get(reloadkeys.keep_running(running, new), unit) == \
            reloadkeys._get(running, unit)


def test_command_line_keys_are_not_news() -> None:
    running = from_dict({"workers": 4})
    new = from_dict({"workers": 2, "relay": {"smart_host": ["mx.example:25"]}})
    assert reloadkeys.restart_changes(running, new) == ["workers"]
    assert reloadkeys.restart_changes(running, new, ignore=frozenset({"workers"})) == []


def test_a_mix_no_file_may_hold_is_refused_naming_the_kept_key() -> None:
    """The running listener takes PROXY headers (restart-only); the file drops it and the
    proxies (reloadable): the mix would refuse every connection until a restart."""
    from authrelay.config import ConfigError

    listen = [{"address": "127.0.0.1:2525", "mode": "smtp", "proxy_protocol": True}]
    running = from_dict({"listen": listen, "relay": {"proxy_trusted": ["10.0.0.0/8"]}})
    new = from_dict({"listen": [{**listen[0], "proxy_protocol": False}]})
    with pytest.raises(ConfigError, match=r"proxy_protocol: needs relay.proxy_trusted.*"
                                          r"with the running listen \(kept until"):
        reloadkeys.reloaded(running, new)
    # A file that keeps its proxies reloads (the listener still waits for the restart).
    ok = from_dict({"listen": [{**listen[0], "proxy_protocol": False}],
                    "relay": {"proxy_trusted": ["10.0.0.0/8"]}})
    assert reloadkeys.reloaded(running, ok).listen == running.listen
