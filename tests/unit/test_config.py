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
    ({"delivery": {"attempt_timeout": "500ms"}}, "delivery.attempt_timeout"),
    ({"delivery": {"attempt_timeout": "-1"}}, "delivery.attempt_timeout"),
    ({"tls": {"cert": "/c", "key": "/k", "second_cert": "/c2"}}, "tls.second_cert"),
    ({"tls": {"cert": "/c", "key": "/k", "second_key": "/k2"}}, "tls.second_key"),
    ({"tls": {"second_cert": "/c2", "second_key": "/k2"}}, "tls.second_cert"),
])
def test_errors_name_the_key(data: dict, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        from_dict(data)
    assert str(e.value).startswith(key)


@pytest.mark.parametrize("name", ["relay example.org", "", ".", "relay\r\n250 AUTH",
                                  "<relay>", "relay\x1b[2J"])
def test_a_hostname_that_would_break_protocol_lines_is_refused(name: str) -> None:
    # It is written into the greeting, EHLO, Received:, Message-ID: and `authrelay dns`:
    # the old code accepted "relay example.org" (check-config said ok; EHLO then named
    # "relay", the zone output did not load) and even a CR LF.
    with pytest.raises(ConfigError) as e:
        from_dict({"hostname": name})
    assert str(e.value).startswith(f"hostname: {name!r} ")
    assert "write this relay's host name" in str(e.value)


def test_hostnames_that_are_kept() -> None:
    for name in ("relay.example.org", "relay_1.example", "localhost", "relay.example.org.",
                 "[192.0.2.1]", "[IPv6:2001:db8::1]"):
        assert from_dict({"hostname": name}).hostname == name


@pytest.mark.parametrize("data,message", [
    ({"hostnme": "x"}, "hostnme: unknown key (did you mean hostname?)"),
    ({"relay": {"smart_hots": []}}, "relay.smart_hots: unknown key (did you mean smart_host?)"),
    ({"auth": {"smart_host": ["a:25"]}}, "auth.smart_host: unknown key (it goes in [relay])"),
    ({"smart_host": ["a:25"]}, "smart_host: unknown key (it goes in [relay])"),
    # A top-level key written after a [section] header (TOML puts it in that table).
    ({"relay": {"hostname": "x"}}, "relay.hostname: unknown key (it goes at the top of the "
                                   "file, before any [section])"),
    ({"colour": 1}, "colour: unknown key"),
])
def test_an_unknown_key_names_the_fix(data: dict, message: str) -> None:
    # The old message was "KEY: unknown key" alone: a misspelt key, or one in the wrong
    # table (a top-level key after a [section] header is the classic TOML slip), left the
    # admin to search the README.
    with pytest.raises(ConfigError) as e:
        from_dict(data)
    assert str(e.value) == message


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


def test_relative_paths_through_a_symlink_are_from_the_real_file(tmp_path) -> None:
    """A config file reached through a symlink (or a linked directory) takes its relative
    paths from the real file's directory: every name of the file means the same state."""
    from authrelay.checkconfig import check
    from authrelay.config import config_dir, load_file

    real = tmp_path / "srv" / "relay"
    real.mkdir(parents=True)
    (real / "authrelay.toml").write_text('aliases_file = "aliases"\n')
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "authrelay.toml").symlink_to(real / "authrelay.toml")
    (tmp_path / "linkdir").symlink_to(real)
    names = [real / "authrelay.toml", etc / "authrelay.toml",
             tmp_path / "linkdir" / "authrelay.toml"]
    for name in names:
        cfg = load_file(name)
        assert (cfg.state_dir, cfg.aliases_file) == (str(real / "var"),
                                                    str(real / "aliases")), name
        assert config_dir(name) == real
        # check-config's "state_dir not set" warning knows it is the default, by any name
        assert any(f.key == "state_dir" and "not set" in f.message for f in check(cfg)), name


def test_relative_paths_are_from_the_config_file(tmp_path, monkeypatch) -> None:
    """load_file: every relative path is taken from the file's directory (state_dir's
    default included); absolute ones and empty ones are kept; the embedded default (no
    file) keeps ./var in the current directory."""
    from authrelay.config import Config, load_file

    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "a.toml").write_text(
        'aliases_file = "aliases"\n'
        '[tls]\ncert = "tls/cert.pem"\nkey = "/abs/key.pem"\n'
        'second_cert = "tls/rsa.pem"\nsecond_key = "tls/rsa.key"\n'
        '[auth]\nbackend = "saslauthd:run/mux"\n'
        '[log]\ntarget = "file:../log/mail.log"\n'
        '[delivery]\ntls_ca_file = "ca.pem"\n'
        '[relay]\nsmart_host = ["h:587"]\nsmart_host_user = "u"\n'
        'smart_host_password_file = "pw"\n'
        '[[relay.smart_host_oauth]]\nhost = "h:587"\nuser = "u"\n'
        'token_url = "https://t/token"\nclient_id = "i"\nsecret_file = "m365.secret"\n'
        'scope = "s"\n')
    monkeypatch.chdir(tmp_path)
    cfg = load_file("etc/a.toml")
    assert cfg.state_dir == str(etc / "var")
    assert (cfg.tls.cert, cfg.tls.key) == (str(etc / "tls/cert.pem"), "/abs/key.pem")
    assert [(p.cert, p.key, p.cert_key) for p in cfg.cert_pairs] == [
        (etc / "tls/cert.pem", Path("/abs/key.pem"), "tls.cert"),
        (etc / "tls/rsa.pem", etc / "tls/rsa.key", "tls.second_cert")]
    assert cfg.auth.backend == f"saslauthd:{etc}/run/mux"
    assert cfg.log.target == f"file:{tmp_path}/log/mail.log"
    assert cfg.aliases_file == str(etc / "aliases")
    assert cfg.delivery.tls_ca_file == str(etc / "ca.pem")
    assert cfg.relay.smart_host_password_file == str(etc / "pw")
    assert cfg.relay.smart_host_oauth[0].secret_file == str(etc / "m365.secret")
    assert cfg.relay.smart_host_oauth_key_file == "" and cfg.relay.smart_host_ca_file == ""
    assert Config().state_dir == "./var"


def test_file_parameters_of_the_dsn_and_redis_url_are_from_the_config_file(
        tmp_path, monkeypatch) -> None:
    """`[auth] dsn` and `[limits] shared` name files in their query (`sslrootcert=`,
    `passfile=`, `ssl_ca_certs=` ...), which asyncpg and redis-py would take from the
    current directory (`/` under systemd): relative ones are taken from the config file's
    directory, as every other path; the rest of the URL keeps its bytes (a password's
    escapes included), and absolute paths, `~/...` and libpq's `sslrootcert=system` stay."""
    from urllib.parse import parse_qs, urlsplit

    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "a.toml").write_text(
        '[auth]\nbackend = "postgresql"\n'
        'dsn = "postgresql://ar:p%40ss%3Fw@db.test:5432/authrelay?sslmode=verify-full'
        '&sslrootcert=certs/db%20ca.pem&sslcert=~/.postgresql/c.crt&sslkey=/abs/k.key'
        '&passfile=pgpass&application_name=a%2Fb"\n'
        '[limits]\nshared = "rediss://:pw@redis.test:6380/0?ssl_ca_certs=redis-ca.pem'
        '&ssl_cert_reqs=required"\n')
    monkeypatch.chdir(tmp_path)
    cfg = load_file("etc/a.toml")
    dsn = urlsplit(cfg.auth.dsn)
    assert dsn.netloc == "ar:p%40ss%3Fw@db.test:5432" and dsn.path == "/authrelay"
    q = parse_qs(dsn.query)
    assert q == {"sslmode": ["verify-full"], "sslrootcert": [str(etc / "certs/db ca.pem")],
                 "sslcert": ["~/.postgresql/c.crt"], "sslkey": ["/abs/k.key"],
                 "passfile": [str(etc / "pgpass")], "application_name": ["a/b"]}
    assert "application_name=a%2Fb" in cfg.auth.dsn  # untouched, as written
    redis = urlsplit(cfg.limits.shared)
    assert redis.netloc == ":pw@redis.test:6380"
    assert parse_qs(redis.query) == {"ssl_ca_certs": [str(etc / "redis-ca.pem")],
                                     "ssl_cert_reqs": ["required"]}
    (etc / "b.toml").write_text(
        '[auth]\nbackend = "postgresql"\n'
        'dsn = "postgresql://ar@db.test/authrelay?sslmode=verify-full&sslrootcert=system"\n')
    assert load_file(etc / "b.toml").auth.dsn.endswith("sslrootcert=system")


@pytest.mark.parametrize("key", ["command_timeout", "data_block_timeout",
                                 "data_final_timeout", "tls_handshake_timeout",
                                 "session_timeout", "stress_command_timeout"])
@pytest.mark.parametrize("zero", ["0s", 0])
def test_a_session_timeout_of_zero_is_refused(key: str, zero: object) -> None:
    """0 would end every session at once or (data_block_timeout, since it bounds the
    commit after the final dot) answer every message 451: refused, naming the key."""
    with pytest.raises(ConfigError) as e:
        from_dict({"limits": {key: zero}})
    assert f"limits.{key}" in str(e.value) and "more than 0" in str(e.value)
    assert getattr(from_dict({"limits": {key: "1s"}}).limits, key) == 1.0


@pytest.mark.parametrize(("data", "key"), [
    ({"log": {"target": "file:/var/log/a\0b"}}, "log.target"),
    ({"state_dir": "/var/lib/a\0b"}, "state_dir"),
    ({"relay": {"smart_host": ["a.example", "b.example\0"]}}, "relay.smart_host[1]"),
    ({"aliases": {"root": ["a@example.org", "b@\0example.org"]}}, "aliases.root[1]"),
    ({"aliases": {"ro\0ot": "a@example.org"}}, "aliases.ro\\u0000ot"),
    ({"listen": [{"address": "127.0.0.1:25", "mode": "smtp"},
                 {"address": "127.0.0.1:587\0", "mode": "submission"}]}, "listen[1].address"),
])
def test_a_nul_in_any_string_is_refused_naming_its_key(data: dict, key: str) -> None:
    # "\u0000" is valid TOML; the old code took it, and a path holding one stopped
    # `serve` with a traceback (ValueError: embedded null byte, at the log file's open).
    with pytest.raises(ConfigError) as e:
        from_dict(data)
    assert str(e.value) == (f"{key}: holds a NUL character (\\u0000): no value of the "
                            "config may (a path, an address, a name)")


@pytest.mark.slow
def test_serve_and_check_config_name_a_nul_in_a_path_without_a_traceback(
        tmp_path: Path) -> None:
    conf = tmp_path / "a.toml"
    conf.write_text(f'state_dir = "{tmp_path}/state"\n[log]\n'
                    f'target = "file:{tmp_path}/a\\u0000b"\n')
    want = f"authrelay: {conf}: error: log.target: holds a NUL character"
    for args in (["serve"], ["check-config"], ["check-config", "--syntax"]):
        r = subprocess.run([sys.executable, "-m", "authrelay", "-c", str(conf), *args],
                           capture_output=True, text=True, timeout=60)
        assert (r.returncode, r.stderr.splitlines()[:1]) == (1, [r.stderr.strip()]), args
        assert r.stderr.startswith(want), (args, r.stderr)
    assert not (tmp_path / "state").exists()


def test_workers_past_the_bound_are_refused() -> None:
    # workers = 10**22 passed check-config; serve then opened a socket per worker until
    # 'cannot listen on ...: Too many open files', naming neither the key nor the cause.
    assert from_dict({"workers": 256}).workers == 256
    for n in (257, 10**22):
        with pytest.raises(ConfigError) as e:
            from_dict({"workers": n})
        assert str(e.value) == (f"workers: {n} is more than 256 (a process each, with its "
                                "sockets and shared memory; 0 = one per core)")


@pytest.mark.slow
def test_serve_workers_option_has_the_files_bounds(tmp_path: Path) -> None:
    # `serve --workers N` replaced the file's value after its checks: 100000 bound a
    # socket per worker until 'Too many open files' (nothing forked, exit 1, no key named).
    conf = tmp_path / "a.toml"
    conf.write_text(f'state_dir = "{tmp_path}/state"\n')
    r = subprocess.run([sys.executable, "-m", "authrelay", "serve", "--workers", "100000",
                        "-c", str(conf)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines()[-1] == ("authrelay serve: error: argument --workers: "
                                         "100000: from 0 (one per core) to 256")
    assert not (tmp_path / "state").exists()
