"""Shared test support: the one place for helpers more than one test file needs.

`tests/` is on sys.path (pyproject's `pythonpath`), so a test imports `support.wait`,
`fakes.smtpserver`, `relayproc` and `smtpclient` directly; no test edits sys.path.

- `support.ci`: is this CI, and `require(...)`: fail under CI=true, skip elsewhere
- `support.wait`: `wait_until` / `until` (sync / async polls on a condition), never a sleep
  standing in for an event
- `support.ports`: free loopback ports (one host, or one port free on all 127.0.0.x);
  `dev_ports()` for the few tests that need the embedded default's fixed 2525/2587/2465
  (a machine-wide turn, then free or fail/skip naming the process holding one)
- `support.sdnotify`: a notify socket in systemd's place: READY=1 from the pid the test
  started proves its server bound its ports (something answering there may be another's)
- `support.certs`: trustme server contexts and certificates installed as certbot does
- `support.maillog`: `ListLog`, a MailLog that keeps its lines in memory
- `support.sessions`: a real client half way through an authenticated transaction
- `support.privileges`: the unprivileged TEST_USER privilege tests drop to
- `support.daemons`: wait until a daemon a test started accepts; stop it by its PID
- `support.inproc`: `ServerThread`, an SMTPServer on its own event loop in a thread;
  `uvloop_relay`, one of `wiring.server` on uvloop as `serve` runs it

Markers (registered in pyproject.toml, `--strict-markers`): `slow` (out of the fast loop,
`pytest -m "not slow"`), `root` (needs root: fails under CI, skips elsewhere, checked in
tests/conftest.py), `external` (starts a Debian daemon or tool from test.sh's APT_PKGS).
"""
