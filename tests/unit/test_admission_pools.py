"""The pools each listener's connections count in (smtpd/admission.py), from the config."""

from __future__ import annotations

from types import SimpleNamespace

from authrelay.config import Listen, from_dict
from authrelay.policy.throttle import LocalThrottle, Pool, Share
from authrelay.smtpd.admission import Acceptor


def pools(data: dict) -> dict[str, tuple[tuple[Pool, ...], int]]:
    cfg = from_dict(data)
    server = SimpleNamespace(cfg=cfg, share=Share(), throttle=LocalThrottle(cfg),
                             oldest=None)
    out = {}
    for ln_cfg in cfg.listen:
        ln = SimpleNamespace(cfg=ln_cfg, mode=ln_cfg.mode, sock=None,
                             name=f"{ln_cfg.mode}:{ln_cfg.address}")
        a = Acceptor(server, ln)  # type: ignore[arg-type]
        out[ln_cfg.mode] = (a.pools, a.cap)
    return out


THREE = [{"address": "127.0.0.1:25", "mode": "smtp"},
         {"address": "127.0.0.1:587", "mode": "submission"},
         {"address": "127.0.0.1:465", "mode": "submissions"}]


def test_defaults_leave_a_reserve_whichever_port_is_flooded() -> None:
    p = pools({"listen": THREE})
    assert p["smtp"] == ((Pool("*", 100), Pool("class:smtp", 80),
                          Pool("listener:smtp:127.0.0.1:25", 80)), 80)
    assert p["submission"] == ((Pool("*", 100),
                                Pool("listener:submission:127.0.0.1:587", 80)), 80)
    assert p["submissions"][1] == 80


def test_explicit_listener_pools() -> None:
    listen = [dict(THREE[0], max_connections=60), dict(THREE[1], max_connections=20),
              THREE[2]]
    p = pools({"listen": listen, "limits": {"pool_reserve_percent": 10}})
    assert p["smtp"][0][-1] == Pool("listener:smtp:127.0.0.1:25", 60)
    assert p["smtp"][1] == 60  # stress mode measured against the smaller pool
    assert p["submission"] == ((Pool("*", 100),
                                Pool("listener:submission:127.0.0.1:587", 20)), 20)
    assert p["submissions"][1] == 90


def test_one_listener_gets_the_whole_pool() -> None:
    p = pools({"listen": [THREE[0]], "limits": {"max_connections": 10}})
    assert p["smtp"] == ((Pool("*", 10), Pool("listener:smtp:127.0.0.1:25", 10)), 10)


def test_listen_max_connections_is_a_config_key() -> None:
    cfg = from_dict({"listen": [dict(THREE[1], max_connections=5)]})
    assert cfg.listen[0] == Listen(address="127.0.0.1:587", mode="submission",
                                   max_connections=5)
