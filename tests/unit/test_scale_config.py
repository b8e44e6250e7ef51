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
