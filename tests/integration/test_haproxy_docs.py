"""docs/SCALING.md's HAProxy configuration, as printed, runs: HAProxy starts with it (ports
and addresses moved to loopback, the stats socket to a temporary directory), checks a node
by `GET /health` (UP; a node that is not there: DOWN; its PostgreSQL stopped: DOWN there
but UP in the fallback backend, which then serves), and the drain procedure's command
works on its admin socket."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from relayproc import RelayProcess
from scalerig import PostgresServer, need
from support import daemons
from support.ports import free_port

pytestmark = [pytest.mark.external, pytest.mark.slow]

DOC = Path(__file__).resolve().parents[2] / "docs" / "SCALING.md"


def documented_config() -> str:
    text = DOC.read_text()
    section = text[text.index("## HAProxy\n"):]
    m = re.search(r"```haproxy\n(.*?)```", section, re.S)
    assert m is not None, "no haproxy block in docs/SCALING.md"
    return m.group(1)


def admin(sock: Path, command: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(sock))
        s.sendall(command.encode() + b"\n")
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out.decode()


def status(sock: Path) -> dict[tuple[str, str], str]:
    lines = admin(sock, "show stat").splitlines()
    head = lines[0].lstrip("# ").split(",")
    out = {}
    for ln in lines[1:]:
        if ln:
            row = dict(zip(head, ln.split(","), strict=False))
            out[(row["pxname"], row["svname"])] = row["status"]
    return out


def _wait_status(sock: Path, want: dict[tuple[str, str], str], log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        st = status(sock)
        if all(st.get(k) == v for k, v in want.items()):
            return
        assert time.monotonic() < deadline, (st, log.read_text())
        time.sleep(0.2)


def _greeting(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        return c.recv(512)


def test_documented_haproxy_config_runs(tmp_path: Path) -> None:
    binary = need("haproxy", shutil.which("haproxy"))
    pg = PostgresServer()
    mport = free_port()
    node = RelayProcess(tmp_path, {"metrics": {"address": f"127.0.0.1:{mport}"},
                                   "auth": {"backend": "postgresql", "dsn": pg.dsn}},
                        users={})
    node.start()
    d = Path(tempfile.mkdtemp(prefix="authrelay-haproxy-doc-"))
    proc = None
    try:
        fe = {"587": free_port(), "465": free_port()}
        cfg = documented_config()
        assert "level admin" in cfg and "option httpchk GET /health" in cfg
        cfg = cfg.replace("/run/haproxy/admin.sock", str(d / "admin.sock"))
        for port, local in fe.items():
            cfg = cfg.replace(f"bind :{port}", f"bind 127.0.0.1:{local}")
        cfg = cfg.replace("10.0.1.1:587", f"127.0.0.1:{node.ports['submission']}")
        cfg = cfg.replace("10.0.1.1:465", f"127.0.0.1:{node.ports['submissions']}")
        dead = free_port("127.0.0.2")
        cfg = cfg.replace("10.0.1.2:587", f"127.0.0.2:{dead}")
        cfg = cfg.replace("10.0.1.2:465", f"127.0.0.2:{dead}")
        cfg = cfg.replace("check port 9587", f"check port {mport}")
        assert "10.0.1." not in cfg and ":9587" not in cfg
        conf = d / "haproxy.cfg"
        conf.write_text(cfg)
        check = subprocess.run([binary, "-c", "-f", str(conf)], capture_output=True,
                               text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        log = d / "haproxy.log"
        with open(log, "ab") as logf:
            proc = subprocess.Popen([binary, "-db", "-f", str(conf)], stdout=logf,
                                    stderr=subprocess.STDOUT)
        daemons.wait_accepting(("127.0.0.1", fe["587"]), proc, log, "haproxy")
        sock = d / "admin.sock"
        _wait_status(sock, {("submission_nodes", "relay1"): "UP",
                            ("submission_nodes", "relay2"): "DOWN",
                            ("submissions_nodes", "relay1"): "UP",
                            ("submission_any", "relay1"): "UP"}, log)
        # Through HAProxy to the node: its greeting.
        assert _greeting(fe["587"]).startswith(b"220 ")
        # The database down for the whole farm: out of the full check, still in the
        # fallback backend, so clients (the cached users) still reach the node.
        pg.stop()
        _wait_status(sock, {("submission_nodes", "relay1"): "DOWN",
                            ("submission_any", "relay1"): "UP"}, log)
        assert _greeting(fe["587"]).startswith(b"220 ")
        pg.start()
        _wait_status(sock, {("submission_nodes", "relay1"): "UP"}, log)
        # The drain procedure's command (docs: "Draining a node").
        assert admin(sock, "set server submission_nodes/relay1 state drain").strip() == ""
        assert status(sock)[("submission_nodes", "relay1")] == "DRAIN"
        # The node stopping: its /health fails, HAProxy takes it out.
        node.stop()
        deadline = time.monotonic() + 30
        while status(sock)[("submissions_nodes", "relay1")] != "DOWN":
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        daemons.stop(proc)
        node.stop()
        pg.cleanup()
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("needle", ["maxconn 4000", "LimitNOFILE"])
def test_documented_limits(needle: str) -> None:
    assert needle in documented_config()
