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
    from authrelay.policy.shared import RedisThrottle
    from authrelay.policy.throttle import LocalThrottle, make_throttle

    cfg = from_dict({"limits": {"shared": "redis://127.0.0.1:1/0"}})
    t = make_throttle(cfg)
    assert isinstance(t, RedisThrottle) and isinstance(t.local, LocalThrottle)
    assert isinstance(make_throttle(from_dict({})), LocalThrottle)
