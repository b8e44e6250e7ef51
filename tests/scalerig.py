"""Real PostgreSQL, Redis and HAProxy for the scale-out tests, started by the tests.

Each component is the Debian package's binary run on a free loopback port from a temporary
directory the test creates and removes; nothing touches a system instance. Contract:
`start()` returns when the component answers; `stop()` ends it (by its PID) and can be
followed by `start()` again on the same port (outage tests); `cleanup()` removes its files.

Missing binaries: the test is skipped on a developer machine, but under CI (CI=true) it
fails: test.sh installs haproxy, postgresql and redis-server, so a missing one there is a
broken install, not a reason to pass.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from support import ci, daemons
from support.ports import free_port
from support.wait import wait_until


def need(what: str, path: str | None) -> str:
    """`path` if set; else skip (developer machine) or fail (CI): support.ci.require."""
    ci.require(path, f"{what} not installed (test.sh installs it)")
    assert path is not None
    return path



# --------------------------------------------------------------------------- PostgreSQL

def pg_bindir() -> str | None:
    """The newest /usr/lib/postgresql/N/bin with initdb (Debian keeps it off PATH)."""
    cands = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if cands:
        return os.path.dirname(cands[-1])
    found = shutil.which("initdb")
    return os.path.dirname(found) if found else None


class PostgresServer:
    """A throw-away cluster: initdb as a non-root user, password (SCRAM) login on
    127.0.0.1:PORT, one database `authrelay` owned by the role `authrelay`."""

    USER = "authrelay"
    PASSWORD = "pg-secret-for-tests"
    DB = "authrelay"

    def __init__(self) -> None:
        self.bindir = need("PostgreSQL (initdb)", pg_bindir())
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="authrelay-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self._as: dict[str, int] = {}
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            pw = None
            for name in ("postgres", "nobody"):
                with contextlib.suppress(KeyError):
                    pw = pwd.getpwnam(name)
                    break
            assert pw is not None, "no unprivileged user to run PostgreSQL as"
            self._as = {"user": pw.pw_uid, "group": pw.pw_gid}
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        os.chmod(self.dir, 0o700)
        self._initdb()

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.USER}:{self.PASSWORD}@127.0.0.1:{self.port}/{self.DB}"

    def _run(self, *cmd: str, env: dict[str, str] | None = None) -> None:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                           cwd=self.dir, env={**os.environ, **(env or {})}, **self._as)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {r.stdout}{r.stderr}")

    def _initdb(self) -> None:
        pwfile = self.dir / "pw"
        pwfile.write_text(self.PASSWORD + "\n")
        if self._as:
            os.chown(pwfile, self._as["user"], self._as["group"])
        self._run(f"{self.bindir}/initdb", "-D", str(self.data), "-U", self.USER,
                  "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8",
                  "--no-instructions", "--locale=C")
        pwfile.unlink()
        self.start()
        self._run(f"{self.bindir}/createdb", "-h", "127.0.0.1", "-p", str(self.port),
                  "-U", self.USER, self.DB, env={"PGPASSWORD": self.PASSWORD})

    def start(self) -> PostgresServer:
        # Loopback only; the unix socket in our own directory; no fsync (a test cluster).
        opts = (f"-p {self.port} -h 127.0.0.1 -k {self.dir} -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100")
        self._run(f"{self.bindir}/pg_ctl", "-D", str(self.data), "-l", str(self.log),
                  "-o", opts, "-w", "-t", "60", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(f"{self.bindir}/pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------- Redis

class RedisServer:
    """redis-server on 127.0.0.1:PORT, no persistence, no password (loopback only)."""

    what = "redis-server"

    def __init__(self) -> None:
        self.binary = need("redis-server", shutil.which("redis-server"))
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="authrelay-redis-"))
        self.log = self.dir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        logf = open(self.log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.dir),
             "--daemonize", "no", "--protected-mode", "yes"],
            stdout=logf, stderr=subprocess.STDOUT)
        logf.close()
        daemons.wait_accepting(("127.0.0.1", self.port), self.proc, self.log, self.what)
        return self

    def stop(self) -> None:
        daemons.stop(self.proc)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisSentinel:
    """One Redis Sentinel (`redis-server --sentinel`, the same binary) monitoring
    `master` under the service name SERVICE; quorum 1 (a test has one Sentinel)."""

    SERVICE = "authrelay"

    what = "redis-sentinel"

    def __init__(self, master: RedisServer) -> None:
        self.binary = need("redis-server", shutil.which("redis-server"))
        self.master = master
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="authrelay-sentinel-"))
        self.log = self.dir / "sentinel.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.SERVICE}/0"

    def start(self) -> RedisSentinel:
        conf = self.dir / "sentinel.conf"  # Sentinel rewrites its config: a file of its own
        conf.write_text(f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
                        f"sentinel monitor {self.SERVICE} 127.0.0.1 {self.master.port} 1\n"
                        f"sentinel down-after-milliseconds {self.SERVICE} 1000\n")
        logf = open(self.log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([self.binary, str(conf), "--sentinel"],
                                     stdout=logf, stderr=subprocess.STDOUT)
        logf.close()
        daemons.wait_accepting(("127.0.0.1", self.port), self.proc, self.log, self.what)
        return self

    def stop(self) -> None:
        daemons.stop(self.proc)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------- HAProxy

class HAProxy:
    """HAProxy in TCP mode with `send-proxy-v2` in front of some backends.

    `frontends` maps a name to (listen port, [(host, port) of each node]). The balance is
    `roundrobin` so consecutive connections alternate between nodes. Health checks every
    200 ms (3 failed: out, so a loaded machine does not flap a node; a killed one leaves
    the rotation within a second): `GET /health` on the node's metrics listener (200, or
    503 when its PostgreSQL or Redis is down or it is stopping: docs/SCALING.md) for a
    node given as (host, port, health port), else a plain TCP connect to the port. With an
    explicit check `port` HAProxy sends them without a PROXY header, and the nodes close
    such a connect-and-close silently."""

    what = "haproxy"

    def __init__(self, frontends: dict[str, tuple[int, list[tuple[str, int]]]]
                 | dict[str, tuple[int, list[tuple[str, int, int]]]],
                 proxy: str = "send-proxy-v2") -> None:
        self.binary = need("haproxy", shutil.which("haproxy"))
        self.frontends = frontends
        self.proxy = proxy
        self.dir = Path(tempfile.mkdtemp(prefix="authrelay-haproxy-"))
        self.cfg = self.dir / "haproxy.cfg"
        self.log = self.dir / "haproxy.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.cfg.write_text(self.config_text())

    def config_text(self) -> str:
        out = [
            "global",
            "    maxconn 2000",
            f"    stats socket {self.dir / 'admin.sock'} level admin",
            "defaults",
            "    mode tcp",
            "    timeout connect 2s",
            "    timeout client 60s",
            "    timeout server 60s",
            "    option redispatch",
            "    retries 3",
        ]
        for name, (port, nodes) in self.frontends.items():
            out += [f"frontend fe_{name}", f"    bind 127.0.0.1:{port}",
                    f"    default_backend be_{name}",
                    f"backend be_{name}", "    balance roundrobin"]
            if any(len(n) == 3 for n in nodes):
                out += ["    option httpchk GET /health", "    http-check expect status 200"]
            for i, node in enumerate(nodes):
                host, nport = node[0], node[1]
                check = node[2] if len(node) == 3 else nport  # type: ignore[misc]
                out.append(f"    server node{i} {host}:{nport} check port {check} "
                           f"inter 200ms fall 3 rise 1 {self.proxy}")
        return "\n".join(out) + "\n"

    def start(self) -> HAProxy:
        logf = open(self.log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([self.binary, "-db", "-f", str(self.cfg)],
                                     stdout=logf, stderr=subprocess.STDOUT)
        logf.close()
        for port, _nodes in self.frontends.values():
            daemons.wait_accepting(("127.0.0.1", port), self.proc, self.log, self.what)
        return self

    def server_status(self, frontend: str, index: int) -> str:
        """HAProxy's own view of node `index` of `frontend`'s backend ("UP", "DOWN",
        "UP 1/3" ...), from its stats socket (`show stat`)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.dir / "admin.sock"))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        for line in data.decode().splitlines():
            f = line.split(",")
            if len(f) > 17 and f[0] == f"be_{frontend}" and f[1] == f"node{index}":
                return f[17]
        raise AssertionError(f"no server node{index} in be_{frontend}: {data[:500]!r}")

    def stop(self) -> None:
        daemons.stop(self.proc)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------- the farm

class Farm:
    """HAProxy (TCP, send-proxy-v2) on 587- and 465-style ports in front of two authrelay
    nodes (A: one process; B: a master and two receiving workers, each with its own
    database pool and Redis client), both on one PostgreSQL (users) and one Redis
    (counters), a fake MX (aiosmtpd) as their smart host. Clients reach HAProxy from
    distinct 127.0.0.x source addresses; the nodes trust only 127.0.0.1 (HAProxy's side)
    for PROXY headers."""

    def __init__(self, tmp: Path, *, limits: dict[str, Any] | None = None,
                 auth: dict[str, Any] | None = None) -> None:
        from fakes.smtpserver import FakeSMTPServer
        from relayproc import RelayProcess, to_toml

        self.tmp = tmp
        self.pg: PostgresServer | None = None
        self.redis: RedisServer | None = None
        self.haproxy: HAProxy | None = None
        self.nodes: dict[str, RelayProcess] = {}
        self.mx = FakeSMTPServer("127.0.0.2", free_port("127.0.0.2")).start()
        try:
            self.pg = PostgresServer()
            self.redis = RedisServer().start()
            for name in ("a", "b"):
                d = tmp / f"node-{name}"
                d.mkdir()
                r = RelayProcess(d, {
                    "hostname": f"node-{name}.test",
                    "relay": {"proxy_trusted": ["127.0.0.1/32"],
                              "smart_host": [f"{self.mx.host}:{self.mx.port}"],
                              "smart_host_tls": "none"},
                    "auth": {"backend": "postgresql", "dsn": self.pg.dsn,
                             "failure_delay": 0.05, **(auth or {})},
                    "limits": {"shared": self.redis.url, **(limits or {})},
                    "delivery": {"retry": ["1s"]},
                }, users={}, workers=1 if name == "a" else 2)  # B: forked workers
                r.config_data["listen"] = [
                    {"address": f"127.0.0.1:{r.ports[m]}", "mode": m, "proxy_protocol": True}
                    for m in ("submission", "submissions")]
                # HAProxy checks GET /health here (the dependency-aware health endpoint).
                r.health_port = free_port()
                r.config_data["metrics"] = {"address": f"127.0.0.1:{r.health_port}"}
                del r.ports["smtp"]
                r.config.write_text(to_toml(r.config_data))
                self.nodes[name] = r
            self.ports = {"submission": free_port(), "submissions": free_port()}
            self.haproxy = HAProxy({
                m: (self.ports[m], [("127.0.0.1", r.ports[m], r.health_port)
                                    for r in self.nodes.values()])
                for m in ("submission", "submissions")})
            for r in self.nodes.values():
                r.start()
            self.haproxy.start()
        except BaseException:
            self.cleanup()
            raise

    def wait_routed(self, name: str) -> None:
        """Until HAProxy routes to node `name` again on every frontend (a restarted node
        is back in the rotation only after a passing health check)."""
        assert self.haproxy is not None
        index = list(self.nodes).index(name)
        for mode in self.ports:
            wait_until(lambda mode=mode: self.haproxy.server_status(mode, index) == "UP",
                       what=f"HAProxy routing {mode} to node {name}", timeout=20)

    @property
    def a(self) -> Any:
        return self.nodes["a"]

    @property
    def b(self) -> Any:
        return self.nodes["b"]

    def cleanup(self) -> None:
        for r in self.nodes.values():
            with contextlib.suppress(Exception):
                r.stop()
        for part in (self.haproxy, self.redis, self.pg):
            if part is not None:
                with contextlib.suppress(Exception):
                    part.cleanup()
        with contextlib.suppress(Exception):
            self.mx.stop()
