"""`authrelay user ...`: manage the built-in user DB from the command line.

Owns: the `user` sub-commands (add, del, passwd, list, address add|del, app-password
add|list|revoke, migrate, setup: client settings and files, clientsetup.py). Contract:
finds its config like every command (-c, $AUTHRELAY_CONFIG, ./authrelay.toml,
/etc/authrelay/authrelay.toml; none: exit 75 EX_TEMPFAIL, nothing written),
edits `cfg.userdb_path` (parent directory created 0700, file 0600) while servers keep
running: they see the change on the next AUTH (userdb generation). With
`[auth] backend = "postgresql"` the same commands edit the shared database at `[auth] dsn`
(auth/pgusers.py; every node sees the change on its next AUTH), and `migrate` copies a
local users.db into it, hashes verbatim. Exit 0 on success,
1 with a one-line message on stderr otherwise. A local database (users.db, containment.db)
on a filesystem that takes no writes (frozen: fsfreeze, a VM snapshot) is refused at once
(`spool/writable.py`'s probe: SQLite writes even to read, its write-ahead log), nothing
done, never waiting for the thaw. Passwords come from `--password-stdin`
(one line, trailing newline removed) or are prompted for twice without echo; they are
never printed or logged.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import sqlite3
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from authrelay import clientsetup
from authrelay.auth import apppasswords
from authrelay.auth.apppasswords import AppPasswordError
from authrelay.auth.authenticator import account_for, external_backend
from authrelay.auth.login import StoreUnavailable
from authrelay.auth.passwords import too_costly
from authrelay.auth.pgusers import PgUserDB, redact_dsn
from authrelay.auth.userdb import (
    UserDB,
    UserDBError,
    UserStore,
    check_new_name,
    lookalike_key,
)
from authrelay.config import load
from authrelay.newfile import replace_with_new
from authrelay.policy.containment import Suspension
from authrelay.policy.suspensions import make_state
from authrelay.spool import writable


class _CliError(Exception):
    pass


_opened: list[UserStore] = []  # closed when the command ends (a pool, a loop)


def _takes_writes(path: Path) -> None:
    """Refuse (exit 1) when the filesystem holding `path` (or its nearest existing
    parent: a database not made yet) takes no write within writable.PROBE_TIMEOUT: its
    SQLite open, change and close would wait for the thaw."""
    where = next((p for p in (path, *path.parents) if p.exists()), path)
    if not writable.writable_forked(where):
        raise _CliError(f"{where}: {writable.NOT_WRITABLE}")


def _open(args: argparse.Namespace) -> UserDB | PgUserDB:
    # No config found: refuse (exit 75) rather than edit a users.db no server reads.
    cfg = load(args.config, embedded=False)
    db: UserDB | PgUserDB
    if cfg.auth.backend == "postgresql":
        db = PgUserDB(cfg.auth.dsn, timeout=max(cfg.auth.backend_timeout, 10.0))
    else:
        _takes_writes(cfg.userdb_path.parent)
        db = UserDB(cfg.userdb_path)
    _opened.append(db)
    if external_backend(cfg):
        # Still done (a user DB prepared before switching backends), but said: a user
        # added here would otherwise meet 535 with nothing telling the admin why.
        print(f"authrelay user: note: [auth] backend is {cfg.auth.backend}: logins are "
              f"checked there, not in {cfg.userdb_path} (used once backend = \"userdb\")",
              file=sys.stderr)
    return db


def _has_terminal() -> bool:
    """Whether getpass can prompt without echo: this process has a controlling terminal
    (the /dev/tty getpass opens)."""
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return False
    os.close(fd)
    return True


def _stdin_line() -> str | None:
    """One line of standard input without its line end; None at its end. Bytes, not the
    locale's text: a legacy (Latin-1) password is kept as its octets (surrogate escapes;
    hashed as the raw bytes, see auth/passwords.py)."""
    line = sys.stdin.buffer.readline().decode("utf-8", "surrogateescape")
    if not line:
        return None
    if line.endswith("\n"):
        line = line[:-1]
        if line.endswith("\r"):  # a file written on Windows
            line = line[:-1]
    return line


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        line = _stdin_line()
        if not line:
            raise _CliError("no password on standard input")
        return line
    if _has_terminal():
        try:
            first = getpass.getpass("Password: ")
            second = getpass.getpass("Password (again): ")
        except EOFError:
            raise _CliError("no password given") from None
    else:
        # No terminal (cron, ssh without -t, a script piping it): the password and its
        # confirmation are read from standard input, a line each, as getpass's fallback
        # read them (scripts rely on it), without that fallback's Python warning.
        got, again = _stdin_line(), _stdin_line()
        if got is None or again is None:
            raise _CliError("no terminal to ask for the password on (cron, ssh without "
                            "-t, a script): give it on standard input with "
                            "--password-stdin (or twice, a line each)")
        first, second = got, again
    if first != second:
        raise _CliError("passwords do not match")
    if not first:
        raise _CliError("password must not be empty")
    return first


def _add(args: argparse.Namespace) -> None:
    db = _open(args)
    check_new_name(args.name)  # a name refused is said before prompting for a password
    db.add(args.name, _read_password(args), args.address or ())
    print(f"user {args.name} added")


def _del(args: argparse.Namespace) -> None:
    _open(args).delete(args.name)
    print(f"user {args.name} deleted")


def _passwd(args: argparse.Namespace) -> None:
    db = _open(args)
    if db.get_hash(args.name) is None:  # ask before prompting for a password
        raise _CliError(f"no user {args.name}")
    db.set_password(args.name, _read_password(args))
    print(f"password of {args.name} changed")
    # App passwords are not tied to the account password (a new phone password must not
    # log out every device): say so, since a compromised account is this command's case.
    apps = sorted(a.name for a in db.app_passwords(args.name))
    if apps:
        print(f"authrelay: note: {args.name}'s {len(apps)} app password"
              f"{'s' if len(apps) != 1 else ''} ({', '.join(apps)}) still work; "
              f"revoke them with: authrelay user app-password revoke {args.name} --name NAME",
              file=sys.stderr)


def _iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _list(args: argparse.Namespace) -> None:
    users = _open(args).list()
    if args.json:
        json.dump([{"name": u.name, "addresses": list(u.addresses),
                    "created": _iso(u.created), "changed": _iso(u.changed)} for u in users],
                  sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    for u in users:
        print(f"{u.name}\t{','.join(u.addresses)}" if u.addresses else u.name)
    _warn_lookalikes([u.name for u in users])


def _warn_lookalikes(names: list[str]) -> None:
    """Name on stderr each stored pair that reads as one name (stored before `user add`
    refused it: userdb.lookalike_key); both keep working."""
    seen: dict[str, str] = {}
    for n in names:
        key = lookalike_key(n)
        if key in seen:
            print(f"warning: users {seen[key]!r} and {n!r} look the same (one name once "
                  "NFKC-normalised and with xn-- labels decoded): delete one", file=sys.stderr)
        else:
            seen[key] = n


def _address(args: argparse.Namespace) -> None:
    db = _open(args)
    if args.action == "add":
        db.add_address(args.name, args.address)
        print(f"{args.name}: address {args.address.lower()} added")
    else:
        db.remove_address(args.name, args.address)
        print(f"{args.name}: address {args.address.lower()} removed")


def _app_password(args: argparse.Namespace) -> None:
    """`user app-password add|list|revoke USER [--name NAME]` (auth/apppasswords.py)."""
    db = _open(args)
    if args.action == "add":
        if not args.app:
            raise _CliError("app-password add: --name NAME is required (e.g. --name phone)")
        pw = db.add_app_password(args.name, args.app)
        # Shown once, never stored in clear: the admin hands it to the user now.
        print(f"app password {args.app} for {args.name}: {apppasswords.display(pw)}")
        print("(shown once; spaces are optional when typing it)", file=sys.stderr)
    elif args.action == "revoke":
        if not args.app:
            raise _CliError("app-password revoke: --name NAME is required")
        db.revoke_app_password(args.name, args.app)
        print(f"app password {args.app} of {args.name} revoked")
    else:
        if db.get_hash(args.name) is None:
            raise _CliError(f"no user {args.name}")
        apps = db.app_passwords(args.name)
        if args.json:
            json.dump([{"name": a.name, "created": _iso(a.created),
                        "last_used": _iso(a.last_used) if a.last_used else None,
                        "last_client": a.last_ip or None} for a in apps],
                      sys.stdout, indent=2)
            sys.stdout.write("\n")
            return
        for a in apps:
            used = f"{_iso(a.last_used)}\t{a.last_ip or '-'}" if a.last_used else "never\t-"
            print(f"{a.name}\tcreated {_iso(a.created)}\tlast used {used}")


def _setup(args: argparse.Namespace) -> None:
    """`user setup NAME`: print the client settings; with --incoming also write the
    Thunderbird autoconfig file and an Apple .mobileconfig profile (clientsetup.py)."""
    cfg = load(args.config, embedded=False)
    email = args.email or ""
    if cfg.auth.backend in ("userdb", "postgresql"):
        db = _open(args)
        if db.get_hash(args.name) is None:
            raise _CliError(f"no user {args.name}")
        if not email:
            addrs = sorted(db.stored_addresses(args.name))
            email = addrs[0] if addrs else ""
    if not email and "@" in args.name:
        email = args.name
    if not email and cfg.relay.local_domains:
        email = f"{args.name}@{cfg.relay.local_domains[0]}"
    if not email:
        raise _CliError(f"no address known for {args.name}: give --email ADDRESS")
    incoming = clientsetup.parse_incoming(args.incoming) if args.incoming else None
    s = clientsetup.settings(cfg, args.name, email, incoming)
    sys.stdout.write(clientsetup.text(s))
    if incoming is None:
        print("\nNo files written: Thunderbird's autoconfig and Apple's profile also need "
              "the server mail is read from: --incoming imaps://HOST (authrelay only "
              "sends).")
        return
    password = None
    if args.include_password:
        password = _read_password(args)
        print(f"authrelay user: warning: the profile holds {args.name}'s password in clear "
              "text (written 0600): hand it over privately and delete it after "
              "installing; an app password (user app-password add) limits the damage",
              file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    xml_path = out / "config-v1.1.xml"
    replace_with_new(xml_path, clientsetup.autoconfig_xml(s), 0o644)
    safe = re.sub(r"[^A-Za-z0-9._@+-]", "_", args.name).lstrip(".") or "user"
    mc_path = out / f"{safe}.mobileconfig"
    replace_with_new(mc_path, clientsetup.mobileconfig(s, password), 0o600 if password else 0o644)
    print(f"\nWrote {xml_path}: Thunderbird autoconfig; publish it at "
          f"https://autoconfig.{s.domain}/mail/config-v1.1.xml (README \"Client set-up\")")
    print(f"Wrote {mc_path}: Apple Mail profile (unsigned"
          f"{', with the password' if password else ', no password inside'}); open it on "
          "the Mac, iPhone or iPad to install")


def _resume(args: argparse.Namespace) -> None:
    """`user resume USER [--release | --delete-held]`: lift a containment suspension
    (policy/suspender.py) on every node, forget the counts that tripped it, and release
    or delete the user's held mail (else it stays held for `authrelay queue`)."""
    import asyncio

    from authrelay.policy.suspensions import make_state
    from authrelay.scheduler import control
    from authrelay.spool.store import Spool

    cfg = load(args.config, embedded=False)
    account = account_for(cfg, args.name)  # as the session counts it (ALICE@REALM: alice)
    _takes_writes(cfg.state_path)  # (containment.db; the held mail's spool besides)

    async def run() -> object:
        state = make_state(cfg)
        try:
            return await state.resume(account)
        finally:
            await state.close()

    try:
        found = asyncio.run(run())
    except Exception as e:  # the database or Redis unreachable: say so, change nothing more
        raise _CliError(f"cannot resume {args.name}: {e}") from None
    print(f"{args.name} resumed" if found else f"{args.name} was not suspended")
    if args.release or args.delete_held:
        op = "release" if args.release else "delete"
        _takes_writes(cfg.spool_dir)  # (no scheduler running: the CLI moves the files)
        try:
            resp = control.perform(Spool(cfg.spool_dir), {"op": op, "user": account})
        except control.ServerBusy as e:
            raise _CliError(str(e)) from None
        if not resp.get("ok"):
            raise _CliError(f"held mail of {args.name}: {resp.get('error')}")
        n = len(resp.get("done", []))
        print(f"{n} held message(s) of {args.name} "
              + ("released" if args.release else "deleted"))


def _suspended(args: argparse.Namespace) -> None:
    """`user suspended`: who is suspended, since when, and why."""
    import asyncio

    cfg = load(args.config, embedded=False)
    _takes_writes(cfg.state_path)  # (containment.db)

    async def run() -> list[Suspension]:
        state = make_state(cfg)
        try:
            return await state.suspensions()
        finally:
            await state.close()

    try:
        found = asyncio.run(run())
    except StoreUnavailable as e:  # PostgreSQL down: one line, exit 1 (module contract)
        raise _CliError(f"cannot list suspensions: user database "
                        f"{redact_dsn(cfg.auth.dsn)}: {e}") from None
    for s in found:
        print(f"{s.user}\tsince {_iso(s.at)}\t{s.reason}\t{s.node}")


def _migrate(args: argparse.Namespace) -> None:
    """Copy every user of a local users.db (hash and addresses) into the PostgreSQL
    database. Users already there are kept as they are unless --replace.

    App passwords are copied only onto a user this run creates. A user already in the
    database keeps exactly its app passwords, --replace or not: the database cannot tell
    one revoked there since (its row is gone) from one never copied, and a migration must
    never revive a revoked credential. Each app password left out is named on stderr."""
    cfg = load(args.config, embedded=False)
    if cfg.auth.backend != "postgresql":
        raise _CliError('migrate copies into PostgreSQL: set [auth] backend = "postgresql" '
                        "and dsn first")
    src = Path(args.source) if args.source else cfg.userdb_path
    if not src.is_file():
        raise _CliError(f"{src}: no such user database")
    _takes_writes(src.parent)
    local = UserDB(src)
    dest = PgUserDB(cfg.auth.dsn, timeout=max(cfg.auth.backend_timeout, 10.0))
    copied = kept = apps = 0
    try:
        for u in local.list():
            h = local.get_hash(u.name)
            if h is None:  # deleted meanwhile
                continue
            existed = dest.get_hash(u.name) is not None
            if dest.insert_hashed(u.name, h, u.addresses, replace=args.replace):
                copied += 1
                if costly := too_costly(h):  # copied: the user exists for `user passwd`
                    print(f"{u.name}: copied, but its password hash costs {costly} "
                          f"(docs/LIMITS.md): never run, so {u.name} cannot log in until "
                          f"`authrelay user passwd {u.name}`", file=sys.stderr)
            else:
                kept += 1
                print(f"{u.name}: exists in the database, kept (--replace to overwrite)",
                      file=sys.stderr)
                continue
            if existed:  # never revive a revoked app password (docstring)
                there = {(a.name, a.hash) for a in dest.app_passwords(u.name)}
                for a in local.app_passwords(u.name):
                    if (a.name, a.hash) not in there:
                        print(f"{u.name}: app password {a.name} not copied: the user was "
                              "already in the database, whose app passwords are kept as "
                              "they are (a revoked one is never revived; add it anew with "
                              "`authrelay user app-password add`)", file=sys.stderr)
                continue
            for a in local.app_passwords(u.name):  # hashes verbatim: devices keep working
                apps += dest.insert_app_hashed(u.name, a)
                if costly := too_costly(a.hash):
                    print(f"{u.name}: app password {a.name} copied, but its hash costs "
                          f"{costly} (docs/LIMITS.md): never run; revoke it and add it anew "
                          "(`authrelay user app-password`)", file=sys.stderr)
    finally:
        local.close()
        dest.close()
    print(f"{copied} user(s) copied from {src}" + (f", {kept} kept" if kept else "")
          + (f", {apps} app password(s)" if apps else ""))


def _run(func: Callable[[argparse.Namespace], None]
         ) -> Callable[[argparse.Namespace], int]:
    def wrapper(args: argparse.Namespace) -> int:
        try:
            func(args)
        except (_CliError, UserDBError, AppPasswordError, clientsetup.SetupError) as e:
            print(f"authrelay user: {e}", file=sys.stderr)
            return 1
        except sqlite3.Error as e:
            print(f"authrelay user: user DB error: {e}", file=sys.stderr)
            return 1
        except OSError as e:
            print(f"authrelay user: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
            return 1
        finally:
            while _opened:
                _opened.pop().close()
        return 0
    return wrapper


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    user = subparsers.add_parser("user", help="manage the user DB (auth.backend = "
                                 "\"userdb\" or \"postgresql\")")
    sub = user.add_subparsers(dest="user_command", metavar="ACTION", required=True)

    p = sub.add_parser("add", help="add a user")
    p.add_argument("name")
    p.add_argument("--password-stdin", action="store_true",
                   help="read the password from the first line of standard input")
    p.add_argument("--address", action="append", metavar="ADDR",
                   help="an address the user may send as (repeatable)")
    p.set_defaults(func=_run(_add))

    p = sub.add_parser("del", help="delete a user")
    p.add_argument("name")
    p.set_defaults(func=_run(_del))

    p = sub.add_parser("passwd", help="change a user's password")
    p.add_argument("name")
    p.add_argument("--password-stdin", action="store_true",
                   help="read the password from the first line of standard input")
    p.set_defaults(func=_run(_passwd))

    p = sub.add_parser("list", help="list users and their addresses")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_run(_list))

    p = sub.add_parser("migrate", help="copy a local users.db into the PostgreSQL database "
                       "(auth.backend = \"postgresql\")")
    p.add_argument("--from", dest="source", metavar="PATH",
                   help="the SQLite user DB to copy (default: <state_dir>/users.db)")
    p.add_argument("--replace", action="store_true",
                   help="overwrite users that exist in the database (hash and addresses; "
                        "their app passwords stay as they are: a revoked one never returns)")
    p.set_defaults(func=_run(_migrate))

    p = sub.add_parser("app-password", help="per-device passwords: add (prints it once), "
                       "list, revoke")
    p.add_argument("action", choices=("add", "list", "revoke"))
    p.add_argument("name", help="the user")
    p.add_argument("--name", dest="app", metavar="NAME",
                   help="the app password's name, e.g. phone (add, revoke)")
    p.add_argument("--json", action="store_true", help="list: machine-readable output")
    p.set_defaults(func=_run(_app_password))

    p = sub.add_parser("setup", help="print the settings for a user's mail program; with "
                       "--incoming also write Thunderbird autoconfig and an Apple profile")
    p.add_argument("name", help="the user (the SMTP AUTH user name)")
    p.add_argument("--email", metavar="ADDR",
                   help="the user's address (default: their first address in the user DB)")
    p.add_argument("--incoming", metavar="URL",
                   help="the server mail is read from, e.g. imaps://outlook.office365.com "
                        "(imaps://, imap://, pop3s://, pop3://): needed for the files")
    p.add_argument("--out", metavar="DIR", default=".",
                   help="where the files go (default: the current directory)")
    p.add_argument("--include-password", action="store_true",
                   help="put the password (prompted, or --password-stdin) into the Apple "
                        "profile: a warning is printed, the file is 0600")
    p.add_argument("--password-stdin", action="store_true",
                   help="with --include-password: read it from standard input")
    p.set_defaults(func=_run(_setup))
    p = sub.add_parser("resume", help="lift a containment suspension (README \"When an "
                       "account is compromised\")")
    p.add_argument("name")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--release", action="store_true", help="send the user's held mail")
    g.add_argument("--delete-held", action="store_true",
                   help="delete the user's held mail (spam)")
    p.set_defaults(func=_run(_resume))

    p = sub.add_parser("suspended", help="list users suspended by containment")
    p.set_defaults(func=_run(_suspended))

    p = sub.add_parser("address", help="add or remove an address a user may send as")
    p.add_argument("action", choices=("add", "del"))
    p.add_argument("name")
    p.add_argument("address")
    p.set_defaults(func=_run(_address))
