"""The authrelay command: every sub-command below (`authrelay COMMAND --help` for each).

Each area registers its own sub-commands (`register(subparsers)`) from the module that owns
it; this file only wires them and resolves the config the same way for every command:
--config/-c, else $AUTHRELAY_CONFIG, else ./authrelay.toml, else /etc/authrelay/authrelay.toml,
else the embedded default (serve only: the other commands exit 75 without a config).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys

from authrelay import version_string
from authrelay.config import ConfigError, NoConfig, error_line

EX_TEMPFAIL = 75  # sysexits.h: try again later (here: once a config is installed)
EX_IOERR = 74
EX_NOPERM = 77

# (module, attribute) registering sub-commands, in the order `--help` lists them.
_AREAS = [
    "authrelay.daemon",  # serve
    "authrelay.checkconfig",  # check-config
    "authrelay.auth.usercli",  # user add/del/passwd/list
    "authrelay.scheduler.queuecli",  # queue list/show/flush/hold/release/delete
    "authrelay.tls",  # cert make
    "authrelay.importer",  # import sendmail-mc | sasldb
    "authrelay.sendmail",  # sendmail (local submission, /usr/sbin/sendmail compatible)
    "authrelay.dkim.cli",  # dkim keygen/list/dns, dns, doctor
    "authrelay.delivery.tlscli",  # tls-policy DOMAIN
    "authrelay.sendtest",  # send-test (a test message through the submission port)
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="authrelay", description=__doc__.splitlines()[0],
        epilog="Installed as sendmail, mailq or newaliases (a symlink), it takes "
               "sendmail's command line.")
    p.add_argument("-c", "--config", help="config file (default: $AUTHRELAY_CONFIG, "
                   "./authrelay.toml, /etc/authrelay/authrelay.toml, else for serve "
                   "the embedded default)")
    p.add_argument("--version", action="version", version=f"authrelay {version_string()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for modname in _AREAS:
        # Every area is part of the package: one that fails to import is a bug, and it
        # says so with its traceback rather than leaving its commands unknown.
        importlib.import_module(modname).register(sub)
    _config_option_everywhere(sub)
    return p


def _config_option_everywhere(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Accept -c/--config after the command too (`authrelay serve -c FILE`, `authrelay
    user add alice -c FILE`): people type it there as often as before it."""
    for parser in set(sub.choices.values()):
        if not any("--config" in a.option_strings for a in parser._actions):
            try:
                parser.add_argument("-c", "--config", default=argparse.SUPPRESS,
                                    help="config file (as before the command)")
            except argparse.ArgumentError:  # a command that uses -c itself keeps it
                pass
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                _config_option_everywhere(action)


def main(argv: list[str] | None = None) -> int:
    """The command line; output to a closed pipe (`authrelay queue | head`) ends quietly
    with status 141 (128 + SIGPIPE), as a C program killed by SIGPIPE would."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # Nobody reads any more: point stdout at /dev/null so the interpreter's final
        # flush does not raise (and print) again.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 141


# Installed under these names (symlinks), the command line is sendmail's.
_SENDMAIL_NAMES = {"sendmail": [], "mailq": ["-bp"], "newaliases": ["-bi"]}


def _sendmail_call(argv: list[str]) -> tuple[list[str] | None, str | None]:
    """(sendmail's arguments, the -c/--config given before it) when argv is `[-c FILE]
    sendmail ...`; (None, None) otherwise."""
    config = None
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-c", "--config") and i + 1 < len(argv):
            config, i = argv[i + 1], i + 2
        elif a.startswith("--config="):
            config, i = a.split("=", 1)[1], i + 1
        elif a.startswith("-c") and len(a) > 2:
            config, i = a[2:], i + 1
        elif a == "sendmail":
            return argv[i + 1:], config
        else:
            return None, None
    return None, None


def _main(argv: list[str] | None) -> int:
    if argv is None:
        argv = sys.argv[1:]
        # Installed as /usr/sbin/sendmail (or mailq, newaliases): sendmail's command line.
        base = os.path.basename(sys.argv[0])
        for name, pre in _SENDMAIL_NAMES.items():
            if base.startswith(name):
                from authrelay import sendmail

                return sendmail.main(pre + argv)
    # `authrelay sendmail` takes sendmail's own flags (-t -i -f ...): hand them over raw.
    # So does `authrelay -c FILE sendmail -bp` (argparse would take -bp for its own).
    cmd, config = _sendmail_call(argv)
    if cmd is not None:
        from authrelay import sendmail

        return sendmail.main(cmd, config=config)
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except NoConfig as e:
        print(f"authrelay: {e}", file=sys.stderr)
        return EX_TEMPFAIL
    except ConfigError as e:
        print(f"authrelay: {error_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except PermissionError as e:  # e.g. `authrelay queue` as a user who may not read it
        print(f"authrelay: {e.filename or ''}: permission denied (run as root or as the "
              "user that runs authrelay serve)", file=sys.stderr)
        return EX_NOPERM
    except BrokenPipeError:
        raise  # main() ends it quietly
    except OSError as e:  # never a traceback for a file system problem: one line
        where = f"{e.filename}: " if e.filename else ""
        print(f"authrelay: {where}{e.strerror or e}", file=sys.stderr)
        return EX_IOERR


if __name__ == "__main__":
    sys.exit(main())
