"""Issue 17 part 3 through a real `authrelay serve`: a client cannot forge maillog lines
or fields, nor make fail2ban's documented filter ban an address it chose.

Over real sockets the client sends what it controls: SASL user names (in AUTH PLAIN's
base64 they may hold CR, LF, NUL, U+2028, quotes), an EHLO name, MAIL FROM / RCPT TO
addresses with quoted local parts, ORCPT/ENVID parameters, PROXY headers on a listener
behind a trusted balancer, all holding `, relay=unknown [10.9.9.9], sasl_username=root`
and the like. Then: every maillog line parses into the fields its event has (no second
`relay=` or `sasl_username=`), nothing but the real client address 127.0.0.1 is read
by the real fail2ban-regex with the filter docs/LIMITS.md documents, and with
`[log] format = "json"` every line is a JSON object.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from relayproc import PASSWORD, RelayProcess, to_toml
from smtpclient import RawClient, b64, client_ctx
from support import ci
from support.ports import free_port

from authrelay.auth.sasl import hidden_character

pytestmark = pytest.mark.slow

FORGED = "10.9.9.9"
EVIL = f"bob, relay=unknown [{FORGED}], sasl_username=root"
NAMES = [
    EVIL,
    f"x\r\nNOQUEUE: reject=535 5.7.8 authentication failed, relay=unknown [{FORGED}]",
    f"a\u2028b\u2029c\x85 [{FORGED}]",
    f'q"uote", relay=x [{FORGED}], n\x00ul',
    f"reject=535 5.7.8 authentication failed, relay=a [{FORGED}]",
    # printable, so it reaches the 535 line: quotes, backslash and brackets escaped
    f'c]: NOQUEUE: reject="x\\" relay=unknown [{FORGED}]',
]


@pytest.fixture(params=["text", "json"])
def relay(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RelayProcess]:
    r = RelayProcess(tmp_path, {"relay": {"proxy_trusted": ["127.0.0.1/32"]},
                                "limits": {"proxy_timeout": "1s"},
                                "log": {"format": request.param},
                                "auth": {"max_failures_per_ip": 100, "failure_delay": 0.01,
                                         "max_failures_per_user": 100}})
    r.config_data["listen"].append({"address": f"127.0.0.1:{(pp := free_port())}",
                                    "mode": "submission", "proxy_protocol": True})
    r.ports["proxied"] = pp
    r.config.write_text(to_toml(r.config_data))
    r.start()
    yield r
    r.stop()



def _plain(user: str, password: str) -> str:
    return b64(f"\0{user}\0{password}")


def attack(relay: RelayProcess) -> None:
    with RawClient(relay.ports["submission"]) as c:
        assert c.reply().code == 220
        assert c.cmd("EHLO laptop.test").code == 250
        assert c.cmd("STARTTLS").code == 220
        c.starttls(client_ctx())
        assert c.cmd(f"EHLO {EVIL.replace(' ', '')}").code in (250, 501)
        for name in NAMES:  # wrong password: the fail2ban line, user name and all
            assert c.cmd(f"AUTH PLAIN {_plain(name, 'wrong')}").code in (535, 501)
        c.cmd("QUIT")
    with RawClient(relay.ports["smtp"]) as c:  # not authenticated: relaying denied
        c.reply()
        c.cmd(f"EHLO x,relay=unknown[{FORGED}],sasl_username=root")
        c.cmd('MAIL FROM:<"a, relay=unknown [10.9.9.9], x=y"@example.org> '
              "ENVID=a+2C+20relay+3Dx+20+5B10.9.9.9+5D")
        c.cmd('RCPT TO:<"b, relay=unknown [10.9.9.9]"@example.net> '
              "ORCPT=rfc822;b+2C+20relay+3D+5B10.9.9.9+5D@example.net")
        c.cmd("QUIT")
    with RawClient(relay.ports["submission"]) as c:  # authenticated: queued with these
        c.reply()
        c.cmd("EHLO laptop.test")
        assert c.cmd("STARTTLS").code == 220
        c.starttls(client_ctx())
        c.cmd("EHLO laptop.test")
        assert c.cmd(f"EHLO x,relay=unknown[{FORGED}],sasl_username=root").code == 250
        assert c.cmd(f"AUTH PLAIN {_plain('alice', PASSWORD)}").code == 235
        assert c.cmd('MAIL FROM:<"a, relay=unknown [10.9.9.9], x=y"@local.test> '
                     "ENVID=a+2C+20relay+3Dx").code == 250
        assert c.cmd('RCPT TO:<"b, relay=unknown [10.9.9.9]"@example.net>').code == 250
        assert c.cmd("DATA").code == 354
        assert c.cmd("Subject: x\r\n\r\nhello\r\n.").code == 250
        c.cmd("QUIT")
    for header in (f"PROXY TCP4 1.2.3.4, relay=x [{FORGED}] 127.0.0.1 1 2\r\n",
                   f"PROXY TCP4 {FORGED}\u2028 127.0.0.1 1 2\r\n"):
        with socket.create_connection(("127.0.0.1", relay.ports["proxied"]), 10) as s:
            s.sendall(header.encode())
            s.settimeout(10)
            while s.recv(4096):  # refused: the server closes
                pass


_KEY = re.compile(r"([A-Za-z_][\w-]*)=")
_NEXT = re.compile(r", (?=[A-Za-z_][\w-]*=)")


def fields(line: str) -> list[str]:
    """The keys of `QID: k=v, k="v", ...` read as an admin's parser would."""
    _qid, sep, rest = line.partition(": ")
    assert sep, line
    keys = []
    while rest:
        m = _KEY.match(rest)
        assert m, (line, rest)
        keys.append(m.group(1))
        rest = rest[m.end():]
        if rest.startswith('"'):
            end = rest.index('"', 1) + 1
        else:
            n = _NEXT.search(rest)
            end = n.start() if n else len(rest)
        rest = rest[end + 2:]
    return keys


def _fail2ban_filter() -> str:
    limits = (Path(__file__).resolve().parents[2] / "docs" / "LIMITS.md").read_text()
    m = re.search(r"`failregex = (.+?)`", limits)
    assert m, "docs/LIMITS.md has no failregex"
    return m.group(1)


@pytest.mark.external
def test_client_values_cannot_forge_the_maillog(relay: RelayProcess) -> None:
    attack(relay)
    relay.wait_for(lambda: relay.maillog().count("disconnect=") >= 3
                   or relay.maillog().count('"disconnect"') >= 3)
    relay.wait_for(lambda: relay.maillog().count("PROXY header refused") >= 2)
    raw = relay.log.read_text(encoding="utf-8")
    lines = raw.splitlines()  # also splits on U+2028, U+0085, ...: none may be raw
    assert lines == raw.split("\n")[:-1] if raw.endswith("\n") else raw.split("\n")
    is_json = relay.config_data["log"]["format"] == "json"
    failed = 0
    for line in lines:
        assert line.isprintable(), line
        if is_json:
            if not line.startswith("{"):
                continue  # not a maillog line
            rec = json.loads(line)
            values = [v for v in rec.values() if isinstance(v, str)]
            assert all(v.isprintable() for v in values), rec
            failed += rec.get("reject", "").startswith("535 5.7.8 authentication failed")
            continue
        if "]: " not in line:
            continue
        body = line.split("]: ", 1)[1]
        keys = fields(body)
        assert len(keys) == len(set(keys)), body  # no second relay=, sasl_username=, ...
        if "reject=535 5.7.8 authentication failed" in body:
            failed += 1
            assert keys[:2] == ["reject", "relay"], body
            assert "relay=unknown [127.0.0.1]" in body, body
    # The engine refuses a user name with a control or invisible character (C0, C1,
    # format, line/paragraph separators: 501 5.5.2, no name logged, 32ff47a); the
    # others reach the 535 line.
    assert failed == sum(1 for n in NAMES if not hidden_character(n))
    assert failed >= 3
    assert "relay=unknown [127.0.0.1]" in raw or '"relay": "unknown [127.0.0.1]"' in raw
    if is_json:
        return
    ci.require_tool("fail2ban-regex", "fail2ban")
    r = subprocess.run(["fail2ban-regex", "-o", "ip", str(relay.log), _fail2ban_filter()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["127.0.0.1"] * failed, r.stdout
    # the queued line: the HELO name is one quoted value
    assert 'helo="x,relay=unknown\\x5b10.9.9.9\\x5d,sasl_username=root"' in raw
