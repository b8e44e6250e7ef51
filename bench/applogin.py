"""What an app-password login costs against a plain one (README "App passwords"), and
what containment's bookkeeping costs per accepted message (README "When an account is
compromised").

    .venv/bin/python bench/applogin.py [N]        (default N = 20 logins of each kind)

One SQLite user DB in a temporary directory (the real store, WAL), one user with an
account password and 10 app passwords, the userdb Authenticator with the credential
cache off (`cache_ttl = 0`: every login runs argon2, the cost a new client or an attacker
pays). The kinds are interleaved login by login, so all are measured in the same run
under the same machine load. Per kind: the median wall time of one `login()`, and the
process CPU per login (argon2 runs in the hashing thread; process CPU counts every
thread of this process, so other work on the machine does not inflate it).
End to end: a real `authrelay serve` (tests/relayproc.py, `cache_ttl = 0`), one AUTH PLAIN
per new TLS connection on the implicit-TLS port, plain and app password interleaved:
median wall time from connect to the 235 (TLS handshake + AUTH), and the server's CPU
per login (from /proc, so the client's work is not in it).
Containment: `LocalStore.record()` (state_dir/containment.db, what a receiving worker
does after each 250, in its containment thread) for a message with 1 and with 10
recipients, for a user with a window already holding ~1000 events, N x 10 times.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from authrelay.auth import passwords  # noqa: E402
from authrelay.auth.authenticator import AuthResult, UserDBAuthenticator  # noqa: E402
from authrelay.auth.userdb import UserDB  # noqa: E402
from authrelay.policy.suspensions import LocalStore  # noqa: E402

APPS = 10


async def main(n: int) -> dict[str, object]:
    tmp = tempfile.TemporaryDirectory()
    db = UserDB(Path(tmp.name) / "users.db")
    db.add("alice", "correct horse battery")
    apps = [db.add_app_password("alice", f"device{i}") for i in range(APPS)]
    taken = {p[:4] for p in apps}
    free = next(a + b + c + d for a in "qz" for b in "xw" for c in "jv" for d in "kq"
                if a + b + c + d not in taken)
    kinds = {
        "plain (account password)": ("correct horse battery", AuthResult.OK),
        f"app password (user with {APPS})": (apps[-1], AuthResult.OK),
        "wrong plain password": ("wrong horse battery", AuthResult.BAD),
        "wrong app password, its prefix exists (worst case)":
            (apps[0][:4] + "zzzzzzzzzzzz", AuthResult.BAD),
        "wrong app password, unknown prefix": (free + "zzzzzzzzzzzz", AuthResult.BAD),
    }
    calls: list[int] = []
    real = passwords.verify_password

    def counting(stored: str, password: str | bytes) -> bool:
        calls.append(1)
        return real(stored, password)

    passwords.verify_password = counting  # count argon2 verifications per login
    auth = UserDBAuthenticator(db, hash_threads=1, cache_ttl=0)
    wall: dict[str, list[float]] = {k: [] for k in kinds}
    cpu: dict[str, list[float]] = {k: [] for k in kinds}
    hashes: dict[str, int] = {}
    try:
        for pw, _ in kinds.values():  # warm up (the dummy hash, SQLite pages)
            await auth.login("alice", pw)
        for _ in range(n):
            for name, (pw, want) in kinds.items():
                calls.clear()
                c0, t0 = time.process_time(), time.perf_counter()
                got = await auth.login("alice", pw)
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
                assert got.result is want, (name, got)
                hashes[name] = len(calls)
    finally:
        passwords.verify_password = real
        auth.close()
        tmp.cleanup()
    plain = "plain (account password)"
    base = statistics.median(cpu[plain])
    out = []
    for name in kinds:
        c = statistics.median(cpu[name])
        out.append({"kind": name, "argon2_per_login": hashes[name],
                    "median_ms": round(statistics.median(wall[name]) * 1000, 1),
                    "cpu_ms": round(c * 1000, 1), "cpu_vs_plain": round(c / base, 2)})
    return {"n": n, "app_passwords": APPS, "argon2": f"m={passwords.MEMORY_COST} KiB, "
            f"t={passwords.TIME_COST}, p={passwords.PARALLELISM}", "results": out}


def end_to_end(n: int) -> list[dict[str, object]]:
    sys.path.insert(0, str(ROOT / "tests"))
    from relayproc import PASSWORD, RelayProcess
    from smtpclient import RawClient, client_ctx, plain

    def server_cpu(pid: int) -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / 100.0  # utime + stime, clock ticks

    with tempfile.TemporaryDirectory() as tmp:
        r = RelayProcess(Path(tmp), {"auth": {"cache_ttl": 0}}).start()
        try:
            for i in range(APPS):
                out = r.cli("user", "app-password", "add", "alice", "--name", f"dev{i}")
            app = out.stdout.strip().rsplit(": ", 1)[1]
            port = r.ports["submissions"]
            kinds = {"plain (account password)": PASSWORD,
                     f"app password (user with {APPS})": app}
            wall: dict[str, list[float]] = {k: [] for k in kinds}
            cpu: dict[str, float] = dict.fromkeys(kinds, 0.0)
            assert r.proc is not None
            for i in range(n + 1):
                for name, pw in kinds.items():
                    c0, t0 = server_cpu(r.proc.pid), time.perf_counter()
                    with RawClient(port, tls=client_ctx()) as c:
                        c.reply()
                        c.cmd("EHLO bench.test")
                        assert c.cmd(f"AUTH PLAIN {plain('alice', pw)}").code == 235
                        c.cmd("QUIT")
                    if i:  # the first round warms up
                        wall[name].append(time.perf_counter() - t0)
                        cpu[name] += server_cpu(r.proc.pid) - c0
        finally:
            r.stop()
    base = cpu["plain (account password)"]
    return [{"kind": k, "median_ms": round(statistics.median(wall[k]) * 1000, 1),
             "server_cpu_ms": round(cpu[k] / n * 1000, 1),
             "cpu_vs_plain": round(cpu[k] / base, 2)} for k in kinds]


def containment(n: int) -> list[dict[str, object]]:
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(Path(tmp) / "containment.db")
        for i in range(300):  # a busy hour behind the user: ~1000 events in the window
            store.record("bob", [("messages", f"old{i}"), ("recipients", f"r{i}@x.test"),
                                 ("recipients", f"s{i}@x.test"),
                                 ("networks", "192.0.2.0/24")], 3600)
        for nrcpt in (1, 10):
            times = []
            for i in range(n * 10):
                items = [("messages", f"q{nrcpt}-{i}"), ("networks", "192.0.2.0/24")]
                items += [("recipients", f"t{j}-{i}@x.test") for j in range(nrcpt)]
                c0 = time.process_time()
                store.record("bob", items, 3600, limits={"messages": 500,
                                                          "recipients": 1000,
                                                          "networks": 20})
                times.append(time.process_time() - c0)
            out.append({"recipients": nrcpt,
                        "cpu_us": round(statistics.median(times) * 1e6)})
        store.close()
    return out


if __name__ == "__main__":
    res = asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 20))
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    res["end_to_end"] = end_to_end(n)
    res["containment_record"] = containment(n)
    print(json.dumps(res, indent=1))
    print("\n| login | argon2 runs | median | CPU | CPU vs plain |\n|---|---|---|---|---|")
    for r in res["results"]:  # type: ignore[union-attr]
        print(f"| {r['kind']} | {r['argon2_per_login']} | {r['median_ms']} ms | "
              f"{r['cpu_ms']} ms | {r['cpu_vs_plain']}x |")
    print("\nEnd to end (TLS connect + AUTH PLAIN on 465, cache_ttl = 0):")
    for r in res["end_to_end"]:  # type: ignore[union-attr]
        print(f"| {r['kind']} | {r['median_ms']} ms | server CPU {r['server_cpu_ms']} ms "
              f"| {r['cpu_vs_plain']}x |")
    for r in res["containment_record"]:  # type: ignore[union-attr]
        print(f"containment record, {r['recipients']} recipient(s): {r['cpu_us']} us CPU")
