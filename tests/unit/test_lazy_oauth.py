"""Authlib (delivery/oauth.py) loads only when [relay] smart_host_auth asks for OAuth.

Importing it doubled `authrelay --help`'s start-up CPU (0.33 -> 0.67 s), so the courier
sees only delivery/bearer.py, and wiring.py imports delivery/oauth.py when it makes the
token source (or preload() does, before a privilege drop). Each case runs in a fresh
interpreter: this test process may have imported anything already.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

OAUTH_RELAY = {
    "smart_host": ["smtp.office365.com:587"], "smart_host_user": "u@example.com",
    "smart_host_auth": "xoauth2",
    "smart_host_oauth_token_url": "https://login.microsoftonline.com/t/oauth2/v2.0/token",
    "smart_host_oauth_client_id": "id",
    "smart_host_oauth_scope": "https://outlook.office365.com/.default",
    "smart_host_oauth_secret_file": "/nonexistent/m365.secret",
}


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_no_oauth_configured_no_authlib() -> None:
    seen = _run("""
        import sys
        from authrelay import cli, wiring
        from authrelay.config import from_dict
        from authrelay.maillog import MailLog
        cfg = from_dict({"relay": {"smart_host": ["mx.example.net:587"]}})
        c = wiring.courier(cfg, MailLog("file:/dev/null"))
        assert c.tokens_for("mx.example.net:587") is None
        print(sorted(m for m in sys.modules
                     if m.split(".")[0] in ("authlib", "joserfc")
                     or m == "authrelay.delivery.oauth"))
    """)
    assert seen == "[]"


def test_serve_preloads_oauth_even_when_unused() -> None:
    """A SIGHUP may turn OAuth on after the privilege drop: `serve`'s preload imports it
    while everything is readable, whatever the config at start says."""
    seen = _run("""
        import sys
        from authrelay import wiring
        from authrelay.config import from_dict
        cfg = from_dict({"relay": {"smart_host": ["mx.example.net:587"]}})
        assert "authrelay.delivery.oauth" not in sys.modules
        wiring.preload(cfg)
        print("authlib" in sys.modules and "authrelay.delivery.oauth" in sys.modules)
    """)
    assert seen == "True"


def test_oauth_configured_preload_imports_it() -> None:
    seen = _run(f"""
        import sys
        from authrelay import wiring
        from authrelay.config import from_dict
        from authrelay.maillog import MailLog
        cfg = from_dict({{"relay": {OAUTH_RELAY!r}}})
        assert "authlib" not in sys.modules
        wiring.preload(cfg)
        loaded = "authlib" in sys.modules and "authrelay.delivery.oauth" in sys.modules
        c = wiring.courier(cfg, MailLog("file:/dev/null"))
        t = c.tokens_for("smtp.office365.com:587")
        print(loaded, type(t).__module__, type(t).__name__)
    """)
    assert seen == "True authrelay.delivery.oauth TokenSource"
