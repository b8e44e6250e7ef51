"""Config keys of the scale-out features (docs/SCALING.md): names, defaults, validation."""

from __future__ import annotations

import pytest

from authrelay.config import ConfigError, from_dict


def test_postgresql_backend_needs_a_dsn() -> None:
    cfg = from_dict({"auth": {"backend": "postgresql",
                              "dsn": "postgresql://u:p@127.0.0.1:5432/authrelay"}})
    assert cfg.auth.backend == "postgresql" and cfg.auth.pool_size == 10
    with pytest.raises(ConfigError, match=r"auth\.dsn"):
        from_dict({"auth": {"backend": "postgresql"}})
    with pytest.raises(ConfigError, match=r"auth\.dsn"):
        from_dict({"auth": {"backend": "postgresql", "dsn": "mysql://x"}})
    with pytest.raises(ConfigError, match=r"auth\.pool_size"):
        from_dict({"auth": {"backend": "postgresql", "dsn": "postgres://h/d", "pool_size": 0}})
    with pytest.raises(ConfigError, match=r"auth\.backend"):
        from_dict({"auth": {"backend": "mysql"}})


def test_limits_shared_is_a_redis_url() -> None:
    assert from_dict({}).limits.shared == ""
    for url in ("redis://127.0.0.1:6379/0", "rediss://h:6380/1", "unix:///run/redis.sock"):
        assert from_dict({"limits": {"shared": url}}).limits.shared == url
    with pytest.raises(ConfigError, match=r"limits\.shared"):
        from_dict({"limits": {"shared": "memcached://x"}})


def test_make_throttle_wraps_the_local_one_when_shared() -> None:
    from authrelay import wiring
    from authrelay.policy.shared import RedisThrottle
    from authrelay.policy.throttle import LocalThrottle, Share

    cfg = from_dict({"limits": {"shared": "redis://127.0.0.1:1/0"}})
    t = wiring.throttle(cfg, Share(), None)
    assert isinstance(t, RedisThrottle) and isinstance(t.local, LocalThrottle)
    assert isinstance(wiring.throttle(from_dict({}), Share(), None), LocalThrottle)


def test_proxy_protocol_keys() -> None:
    cfg = from_dict({"listen": [{"address": "127.0.0.1:2587", "mode": "submission",
                                 "proxy_protocol": True}],
                     "relay": {"proxy_trusted": ["10.0.0.10/32", "fd00::/64"]},
                     "limits": {"proxy_timeout": "3s"}})
    assert cfg.listen[0].proxy_protocol and cfg.limits.proxy_timeout == 3.0
    assert not from_dict({}).listen[0].proxy_protocol
    with pytest.raises(ConfigError, match=r"listen\[0\]\.proxy_protocol"):
        from_dict({"listen": [{"address": "127.0.0.1:2587", "proxy_protocol": True}]})
    with pytest.raises(ConfigError, match=r"relay\.proxy_trusted\[0\]"):
        from_dict({"relay": {"proxy_trusted": ["haproxy.example.org"]}})


def test_proxy_networks() -> None:
    from authrelay.smtpd.proxy import Networks

    n = Networks(["10.0.0.0/24", "fd00::/64"])
    assert "10.0.0.7" in n and "::ffff:10.0.0.7" in n and "fd00::1" in n
    assert "10.0.1.7" not in n and "fd01::1" not in n and "garbage" not in n
