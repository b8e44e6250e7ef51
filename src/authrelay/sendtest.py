"""`authrelay send-test`: submit one test message through the relay's own submission port.

Owns the check a person makes on a new relay: connect to the config's submission listener
(STARTTLS on a `submission` one, else TLS from the first byte on a `submissions` one, or
`--server HOST:PORT`), authenticate with AUTH PLAIN as `--user` (the password prompted
for, or one line on stdin with `--password-stdin`), send a short message to `--to`, and
print the server's replies, the last one with the queue id: `250 2.0.0 Ok: queued as ID`.
It is a real SMTP client (the standard library's smtplib), so what it proves is what a
mail client would see.

TLS: the certificate is verified, against the system CAs (then the connection goes to
`hostname`, the name the certificate must carry, as a mail client's would), or against
the relay's own self-signed certificates when it serves them (state_dir/tls/cert.pem,
or `authrelay cert make`'s named in [tls] cert/second_cert, as a second pair requires: then
to the listener's address). `--insecure` skips the check.
Failure policy: exit 0 when the message was accepted; 1 when the server refused it (AUTH,
MAIL, RCPT or DATA: its reply is printed); 75 (EX_TEMPFAIL) when it could not be reached
or TLS failed, one line on stderr.
"""

from __future__ import annotations

import argparse
import email.policy
import email.utils
import getpass
import smtplib
import ssl
import sys
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path

from authrelay.config import Config, load, parse_hostport

EX_TEMPFAIL = 75


def _listener(cfg: Config, server: str | None) -> tuple[str, int, bool]:
    """(host, port, implicit TLS)."""
    if server:
        host, port = parse_hostport(server, "--server", 587)
        modes = {ln.mode for ln in cfg.listen if ln.port == port}
        return host, port, "submissions" in modes or (not modes and port == 465)
    for mode, implicit in (("submission", False), ("submissions", True)):
        for ln in cfg.listen:
            if ln.mode == mode:
                host = ln.host
                if host in ("0.0.0.0", ""):
                    host = "127.0.0.1"
                elif host == "::":
                    host = "::1"
                return host, ln.port, implicit
    raise SystemExit("authrelay send-test: no submission listener in the config "
                     "(give --server HOST:PORT)")


def _context(cfg: Config, insecure: bool) -> tuple[ssl.SSLContext, str | None]:
    if insecure:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx, None
    own = ([cfg.cert_path] if cfg.self_signed
           else [pair.cert for pair in cfg.cert_pairs if _self_signed(pair.cert)])
    if own:
        # Those certificates alone are trusted (no system CA): pinned, so the name is not
        # checked (`cert make` writes hostname, localhost and loopback addresses).
        ctx = ssl.create_default_context(cafile=str(own[0]))
        for cert in own[1:]:
            ctx.load_verify_locations(cafile=str(cert))
        ctx.check_hostname = False
        return ctx, None
    return ssl.create_default_context(), cfg.hostname


def _self_signed(cert: Path) -> bool:
    """Whether the first certificate of `cert` is self-signed (`authrelay cert make`'s,
    named in [tls] cert or second_cert); False when it cannot be read."""
    from cryptography import x509

    try:
        leaf = x509.load_pem_x509_certificate(cert.read_bytes())
    except (OSError, ValueError):
        return False
    return leaf.issuer == leaf.subject


def _cmd(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    host, port, implicit = _listener(cfg, args.server)
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"{args.user}'s password: ")
    sender = args.sender or (args.user if "@" in args.user else f"{args.user}@{cfg.hostname}")
    msg = EmailMessage()
    msg["From"], msg["To"] = sender, args.to
    msg["Subject"] = "authrelay test message"
    msg["Date"] = email.utils.formatdate(localtime=True)
    msg["Message-ID"] = email.utils.make_msgid(domain=cfg.hostname)
    msg.set_content(f"A test message sent with `authrelay send-test` through {host}:{port} "
                    f"as {args.user}.\n")
    try:
        ctx, name = _context(cfg, args.insecure)
    except (OSError, ssl.SSLError) as e:
        print(f"authrelay send-test: TLS: {e}", file=sys.stderr)
        return EX_TEMPFAIL
    if name is not None and not args.server:
        host = name  # a real certificate names `hostname`: connect as a client would
    print(f"connecting to {host}:{port} ({'TLS' if implicit else 'STARTTLS'})")
    try:
        if implicit:
            smtp: smtplib.SMTP = smtplib.SMTP_SSL(host, port, timeout=args.timeout,
                                                  context=ctx)
        else:
            smtp = smtplib.SMTP(host, port, timeout=args.timeout)
        with smtp:
            smtp.ehlo()
            if not implicit:
                code, resp = smtp.starttls(context=ctx)
                print(f"{code} {resp.decode(errors='replace')}")
                smtp.ehlo()
            try:
                code, resp = smtp.login(args.user, password)
            except smtplib.SMTPAuthenticationError as e:
                err = e.smtp_error
                text = err.decode(errors="replace") if isinstance(err, bytes) else err
                print(f"{e.smtp_code} {text}")
                return 1
            print(f"{code} {resp.decode(errors='replace')}")
            steps: list[tuple[str, Callable[[], tuple[int, bytes]]]] = [
                ("MAIL", lambda: smtp.mail(sender)),
                ("RCPT", lambda: smtp.rcpt(args.to)),
                ("DATA", lambda: smtp.data(msg.as_bytes(policy=email.policy.SMTP)))]
            for _verb, fn in steps:
                code, resp = fn()
                print(f"{code} {resp.decode(errors='replace')}")
                if code >= 400:
                    return 1
        return 0
    except smtplib.SMTPNotSupportedError as e:
        print(f"authrelay send-test: {e}", file=sys.stderr)
        return 1
    except (OSError, smtplib.SMTPException, ssl.SSLError) as e:
        print(f"authrelay send-test: {host}:{port}: {type(e).__name__}: {e}",
              file=sys.stderr)
        return EX_TEMPFAIL


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("send-test", help="send a test message through the submission port "
                       "with AUTH (prompts for the password)")
    p.add_argument("--user", required=True, help="the account to authenticate as")
    p.add_argument("--to", required=True, help="the recipient")
    p.add_argument("--from", dest="sender", help="the sender (default: the user, or "
                   "USER@hostname)")
    p.add_argument("--server", help="HOST:PORT (default: the config's submission listener)")
    p.add_argument("--password-stdin", action="store_true",
                   help="read the password from one line of standard input")
    p.add_argument("--insecure", action="store_true",
                   help="do not verify the server's certificate")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    p.set_defaults(func=_cmd)

