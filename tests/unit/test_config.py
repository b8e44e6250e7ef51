"""Config: names, defaults, and errors that name the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from authrelay.config import ConfigError, from_dict, load_file, parse_duration, parse_size


def test_embedded_default() -> None:
    cfg = from_dict({})
    assert [(ln.address, ln.mode) for ln in cfg.listen] == [
        ("127.0.0.1:2525", "smtp"), ("127.0.0.1:2587", "submission"),
        ("127.0.0.1:2465", "submissions")]
    assert cfg.state_dir == "./var" and cfg.self_signed
    assert cfg.limits.max_message_size == 20480000


@pytest.mark.parametrize("data,key", [
    ({"limits": {"max_recipientz": 5}}, "limits.max_recipientz"),
    ({"bogus": 1}, "bogus"),
    ({"limits": {"max_recipients": "many"}}, "limits.max_recipients"),
    ({"limits": {"command_timeout": "forever"}}, "limits.command_timeout"),
    ({"listen": [{"address": "127.0.0.1:25", "mode": "lmtp"}]}, "listen[0].mode"),
    ({"relay": {"trusted_networks": ["10.0.0.0/33"]}}, "relay.trusted_networks[0]"),
    ({"auth": {"backend": "ldap"}}, "auth.backend"),
    ({"auth": {"mechanisms": ["CRAM-MD5"]}}, "auth.mechanisms[0]"),
    ({"delivery": {"tls": "always"}}, "delivery.tls"),
])
def test_errors_name_the_key(data: dict, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        from_dict(data)
    assert str(e.value).startswith(key)


def test_units() -> None:
    assert parse_duration("10m") == 600 and parse_duration("5d") == 432000
    assert parse_size("20MB") == 20_000_000 and parse_size("1KiB") == 1024


@pytest.mark.slow
def test_file_and_check_config(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('hostname = "r.example"\n[limits]\nmax_message_size = "10MB"\n'
                    '[[listen]]\naddress = "[::1]:2587"\nmode = "submission"\n')
    cfg = load_file(good)
    assert cfg.limits.max_message_size == 10_000_000 and cfg.listen[0].host == "::1"
    bad = tmp_path / "bad.toml"
    bad.write_text("[relay]\nsmart_hots = []\n")
    r = subprocess.run([sys.executable, "-m", "authrelay", "check-config", str(bad)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "relay.smart_hots: unknown key" in r.stderr
    r = subprocess.run([sys.executable, "-m", "authrelay", "check-config", str(good)],
                       capture_output=True, text=True)
    assert r.returncode == 0


@pytest.mark.slow
def test_config_option_after_the_command(tmp_path: Path) -> None:
    cfg = tmp_path / "a.toml"
    cfg.write_text(f'state_dir = "{tmp_path}/state"\n')
    for args in (["-c", str(cfg), "user", "list"], ["user", "list", "-c", str(cfg)],
                 ["user", "list", "--config", str(cfg)]):
        r = subprocess.run([sys.executable, "-m", "authrelay", *args], capture_output=True,
                           text=True)
        assert r.returncode == 0, (args, r.stderr)
    assert (tmp_path / "state" / "users.db").exists()  # the file named after the command
