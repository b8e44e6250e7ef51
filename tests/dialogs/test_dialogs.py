"""Scripted client/server dialogs, against a real authrelay process and the engine alone.

Two parametrised tests run every `*.dialog` file here: `test_dialog` over sockets against a
real `authrelay serve`, `test_dialog_engine` against the sans-I/O engine
(smtpd/protocol.py) driven by tests/engineharness.py, with no sockets at all. Script lines:
  @listener MODE     connect to smtp | submission | submissions (default smtp)
  C: text            send text + CRLF ({plain USER|PASS|AUTHZID}, {b64 TEXT} and
                     {rep TEXT N}, TEXT N times, expand)
  R: bytes           send raw bytes, Python escapes (\\r \\n \\x00 ...), no CRLF added
  S: prefix          the next reply's last line starts with prefix
  S~ regex           the next reply (all lines joined by newline) matches regex (search)
  S!~ regex          the next reply does not match regex
  +~ regex / +!~ regex   the same checks on the reply already read (no new read)
  TLS                client side of STARTTLS (the server already said 220)
  TLS alpn=A,B       the same, offering those ALPN protocols (RFC 7301)
  TLS alpn=A refused the handshake fails with the server's no_application_protocol alert;
                     the script ends there (the engine has no TLS layer: its run ends)
  CLOSED             the server closes the connection
  # ...              comment
Every protocol bug fixed adds a dialog here.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from engineharness import Harness
from relayproc import PASSWORD, RelayProcess
from smtpclient import RawClient, b64, client_ctx, plain

HERE = Path(__file__).parent
SCRIPTS = sorted(HERE.glob("*.dialog"))


OVERRIDES: dict[str, Any] = {
    "limits": {"max_message_size": 100000, "max_recipients": 3, "bad_rcpt_limit": 0,
               "max_errors": 50, "max_junk_commands": 10},
    # The first local domain an IDN as a U-label (postmaster_idn.dialog).
    "relay": {"trusted_networks": ["127.0.0.99/32"],
              "local_domains": ["bücher.example", "local.test"]},
}
USERS = {"alice": PASSWORD, "bob": "bob pw"}


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    r = RelayProcess(tmp_path_factory.mktemp("dialogs"), overrides=OVERRIDES,
                     users=USERS).start()
    yield r
    r.stop()


def _expand(text: str) -> str:
    def sub(m: re.Match[str]) -> str:
        parts = m.group(1).split(" ", 1)
        if parts[0] == "plain":
            args = parts[1].split("|")
            user = args[0]
            pw = args[1] if len(args) > 1 else PASSWORD
            authz = args[2] if len(args) > 2 else ""
            return plain(user, pw, authz)
        if parts[0] == "b64":
            return b64(parts[1] if parts[1] != "PASSWORD" else PASSWORD)
        raise ValueError(m.group(0))
    # {rep TEXT N}: TEXT repeated N times (long lines), expanded first
    text = re.sub(r"\{rep (\S+) (\d+)\}", lambda m: m.group(1) * int(m.group(2)), text)
    return re.sub(r"\{((?:plain|b64) [^}]*)\}", sub, text)


def _mode(lines: list[str]) -> str:
    mode = "smtp"
    for ln in lines:
        if ln.startswith("@listener "):
            mode = ln.split()[1]
    return mode


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_dialog(relay: RelayProcess, script: Path) -> None:
    lines = script.read_text().splitlines()
    mode = _mode(lines)
    tls = client_ctx() if mode == "submissions" else None
    with RawClient(relay.ports[mode], tls=tls) as c:
        _run(script, lines, c)


class _EngineReply:
    def __init__(self, lines: list[str]) -> None:
        self.lines = lines


class EngineClient:
    """The RawClient interface over the engine harness: no sockets."""

    def __init__(self, mode: str) -> None:
        self.h = Harness(mode=mode, overrides=OVERRIDES, users=dict(USERS), auto_tls=False)

    def send(self, data: bytes) -> None:
        self.h.feed(data)

    def reply(self) -> _EngineReply:
        r = self.h.next_reply()
        assert r is not None, "the engine sent no (complete) reply"
        return _EngineReply(r)

    def starttls(self, _ctx: object) -> None:
        self.h.finish_tls()

    def closed(self) -> bool:
        return self.h.closed and self.h.next_reply() is None


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_dialog_engine(script: Path) -> None:
    lines = script.read_text().splitlines()
    _run(script, lines, EngineClient(_mode(lines)))


def _run(script: Path, lines: list[str], c: Any) -> None:
    transcript: list[str] = []
    got = ""
    for n, ln in enumerate(lines, 1):
        where = f"{script.name}:{n}: {ln}"
        if not ln.strip() or ln.startswith("#") or ln.startswith("@"):
            continue
        if ln == "C:":
            ln = "C: "
        if ln.startswith("C: "):
            text = _expand(ln[3:])
            transcript.append(f"C: {text}")
            c.send(text.encode() + b"\r\n")
        elif ln.startswith("R: "):
            raw = ln[3:].encode().decode("unicode_escape").encode("latin-1")
            transcript.append(f"R: {raw!r}")
            c.send(raw)
        elif ln.startswith(("+~ ", "+!~ ")):
            ctx = f"{where}\n--- transcript\n" + "\n".join(transcript)
            if ln.startswith("+~ "):
                assert re.search(ln[3:], got), ctx
            else:
                assert not re.search(ln[4:], got), ctx
        elif ln.startswith(("S: ", "S~ ", "S!~ ")):
            r = c.reply()
            got = "\n".join(r.lines)
            transcript.append(f"S: {got}")
            ctx = f"{where}\n--- transcript\n" + "\n".join(transcript)
            if ln.startswith("S: "):
                assert r.lines[-1].startswith(ln[3:]), ctx
            elif ln.startswith("S~ "):
                assert re.search(ln[3:], got), ctx
            else:
                assert not re.search(ln[4:], got), ctx
        elif ln.strip() == "TLS" or ln.startswith("TLS "):
            words = ln.split()[1:]
            tls = client_ctx()
            for w in words:
                if w.startswith("alpn="):
                    tls.set_alpn_protocols(w[5:].split(","))
            transcript.append(f"-- {ln}")
            if "refused" in words:
                if isinstance(c, EngineClient):
                    return
                with pytest.raises(ssl.SSLError, match="alert no application protocol"):
                    c.starttls(tls)
                return
            c.starttls(tls)
        elif ln.strip() == "CLOSED":
            assert c.closed(), f"{where}: server did not close"
        else:
            raise AssertionError(f"{where}: bad script line")
