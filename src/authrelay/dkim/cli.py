"""Commands: `authrelay dkim keygen|list|dns`, `authrelay dns`, `authrelay doctor`.

`dkim keygen DOMAIN [--selector S] [--algorithm rsa|ed25519|both]` writes
`state_dir/dkim/DOMAIN/SELECTOR.key` (0600; owned by `user` when run as root) and prints
the TXT records to publish in zone-file form. With `both` (the default) it makes two
selectors, `S-rsa` and `S-ed25519` (one key per selector: a TXT record holds one key);
S defaults to the current YYYYMM. A running server picks new keys up on SIGHUP.
Exit status: 0 done, 1 bad input or a key that exists already.
"""

from __future__ import annotations

import argparse
import os
import pwd
import sys

from authrelay.config import load
from authrelay.dkim.keys import (
    DOMAIN_RE,
    DkimKeyError,
    KeyStore,
    default_selector,
    key_domain,
)


def _owner(user: str) -> tuple[int, int] | None:
    if not user or os.geteuid() != 0:
        return None
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return None
    return pw.pw_uid, pw.pw_gid


def _cmd_keygen(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    store = KeyStore(cfg.dkim_dir)
    base = args.selector or default_selector()
    algs = ["rsa", "ed25519"] if args.algorithm == "both" else [args.algorithm]
    made = []
    try:
        for alg in algs:
            sel = f"{base}-{alg}" if args.algorithm == "both" else base
            made.append(store.generate(args.domain, sel, alg, owner=_owner(cfg.user)))
    except (DkimKeyError, OSError) as e:
        for k in made:  # all or nothing: a half-made pair is confusing
            k.path.unlink(missing_ok=True)
        print(f"authrelay: {e}", file=sys.stderr)
        return 1
    for k in made:
        print(f"; {k.algorithm} key written to {k.path}", file=sys.stderr)
    print(f"; Publish in the zone of {made[0].domain}, then reload authrelay (SIGHUP) "
          "and run `authrelay doctor`:", file=sys.stderr)
    for k in made:
        print(k.zone_line())
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    store = KeyStore(cfg.dkim_dir).load()
    signed = {key_domain(d) for d in cfg.dkim.domains}
    for k in store.all():
        note = "" if not signed or k.domain in signed else "  (not in dkim.domains: unused)"
        print(f"{k.domain}\t{k.selector}\t{k.algorithm}-{k.bits}\t{k.path}{note}")
    for p in store.problems:
        print(f"problem: {p}", file=sys.stderr)
    if not store.keys:
        print(f"no keys in {cfg.dkim_dir} (authrelay dkim keygen DOMAIN)", file=sys.stderr)
    return 1 if store.problems else 0


def _cmd_dkim_dns(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    store = KeyStore(cfg.dkim_dir).load()
    keys = store.for_domain(args.domain)
    if not keys:
        print(f"authrelay: no DKIM key for {args.domain} in {cfg.dkim_dir} "
              f"(authrelay dkim keygen {args.domain})", file=sys.stderr)
        return 1
    for k in keys:
        print(k.zone_line())
    return 0


def _bad_domain(names: list[str]) -> str:
    """The first of `names` that is no domain name ("" if all are): each one becomes the
    owner of zone lines, so a space or a newline in it would print records BIND refuses,
    or records the admin never asked for."""
    return next((n for n in names if not DOMAIN_RE.match(key_domain(n))), "")


def _cmd_dns(args: argparse.Namespace) -> int:
    from authrelay.dkim import records

    bad = _bad_domain(args.domains)
    if bad:
        print(f"authrelay: {bad!r} is not a domain name", file=sys.stderr)
        return 1
    cfg = load(args.config)
    recs = records.build(cfg, args.domains)
    print(records.render(recs))
    if not any(r.rtype == "SRV" for r in recs):
        print("; no sending domain: name one (authrelay dns DOMAIN) or make its DKIM keys "
              "(authrelay dkim keygen DOMAIN)")
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from authrelay.dkim import doctor

    bad = _bad_domain(args.domains)
    if bad:
        print(f"authrelay: {bad!r} is not a domain name", file=sys.stderr)
        return 1
    cfg = load(args.config)
    return doctor.main(cfg, args.domains, as_json=args.json)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("dkim", help="DKIM keys: keygen, list, dns")
    s = p.add_subparsers(dest="dkim_command", metavar="ACTION", required=True)
    k = s.add_parser("keygen", help="make DKIM key(s) for a domain; print the TXT records")
    k.add_argument("domain")
    k.add_argument("--selector", help="selector (default: YYYYMM; with both algorithms "
                   "the selectors are S-rsa and S-ed25519)")
    k.add_argument("--algorithm", choices=("rsa", "ed25519", "both"), default="both",
                   help="rsa (2048 bits), ed25519 (RFC 8463) or both (default)")
    k.set_defaults(func=_cmd_keygen)
    ls = s.add_parser("list", help="list the DKIM keys (domain, selector, algorithm, file)")
    ls.set_defaults(func=_cmd_list)
    d = s.add_parser("dns", help="print a domain's DKIM TXT records again")
    d.add_argument("domain")
    d.set_defaults(func=_cmd_dkim_dns)

    dn = sub.add_parser("dns", help="every DNS record to publish for this relay "
                        "(DKIM, SPF, DMARC, PTR, SRV)")
    dn.add_argument("domains", nargs="*", metavar="DOMAIN",
                    help="sending domains (default: the domains with DKIM keys)")
    dn.set_defaults(func=_cmd_dns)

    dr = sub.add_parser("doctor", help="check the published DNS records, TLS certificate "
                        "and smart host; exit 0 only when all pass")
    dr.add_argument("domains", nargs="*", metavar="DOMAIN",
                    help="sending domains (default: the domains with DKIM keys)")
    dr.add_argument("--json", action="store_true", help="machine-readable output")
    dr.set_defaults(func=_cmd_doctor)
