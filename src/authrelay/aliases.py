"""Local aliases for the sendmail command: mail for `root` reaches a real address.

Owns the expansion of local names, as sendmail's and Postfix's aliases(5) do for local
mail. A recipient is local when it has no domain (`root`, as cron writes it) or its domain
is the relay's `hostname` (or localhost). Its name is looked up in the config's [aliases]
table, then in `aliases_file` (the /etc/aliases format: `name: target, target`, `#`
comments, continuation lines starting with white space); targets are expanded again
(at most MAX_DEPTH levels), unqualified ones get `@hostname`. A name that expands to
itself, or a loop, ends the expansion there (the address is kept as it is); each name is
expanded once per call (a name met again adds nothing), so the work is linear in the
table whatever its lists include. Targets that
are programs (`|cmd`), files (`/path`) or `:include:` lists have no meaning for a relay:
they are left out and reported by `problems()` (check-config shows them).

Contract: `expand(cfg, rcpts)` never raises; an unreadable aliases_file counts as empty
(check-config reports it). The result keeps order and drops duplicates (case-insensitive).
"""

from __future__ import annotations

from pathlib import Path

from authrelay.config import Config

MAX_DEPTH = 10
LOCAL_DOMAINS_ALWAYS = ("localhost", "localhost.localdomain")


def parse_aliases_file(text: str) -> tuple[dict[str, list[str]], list[str]]:
    """(name -> targets, problems) of an /etc/aliases text."""
    table: dict[str, list[str]] = {}
    problems: list[str] = []
    logical: list[tuple[int, str]] = []
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if raw[:1] in (" ", "\t") and logical:
            logical[-1] = (logical[-1][0], logical[-1][1] + " " + raw.strip())
        else:
            logical.append((n, raw.strip()))
    for n, line in logical:
        name, sep, rest = line.partition(":")
        name = name.strip().strip('"').lower()
        if not sep or not name:
            problems.append(f"line {n}: not `name: target`")
            continue
        targets = []
        for t in (x.strip().strip('"') for x in rest.split(",")):
            if not t:
                continue
            if t.startswith(("|", "/", ":include:")):
                problems.append(f"line {n}: {name}: {t.split()[0]} (programs, files and "
                                ":include: are not supported; left out)")
                continue
            targets.append(t)
        if targets:
            table[name] = targets
    return table, problems


def load(cfg: Config) -> tuple[dict[str, list[str]], list[str]]:
    """The effective table (aliases_file, overridden by [aliases]) and its problems."""
    table: dict[str, list[str]] = {}
    problems: list[str] = []
    if cfg.aliases_file:
        try:
            text = Path(cfg.aliases_file).read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            problems.append(f"{cfg.aliases_file}: {e.strerror}")
        else:
            table, file_problems = parse_aliases_file(text)
            problems += [f"{cfg.aliases_file}: {p}" for p in file_problems]
    for name, targets in cfg.aliases:
        table[name] = list(targets)
    return table, problems


def problems(cfg: Config) -> list[str]:
    return load(cfg)[1]


def _local_name(addr: str, cfg: Config) -> str | None:
    local, at, domain = addr.rpartition("@")
    if not at:
        return addr.lower()
    d = domain.lower().rstrip(".")
    if d == cfg.hostname.lower() or d in LOCAL_DOMAINS_ALWAYS:
        return local.lower()
    return None


def is_local(cfg: Config, addr: str) -> bool:
    """Whether `addr` is a local name that [aliases] may rewrite (no I/O)."""
    return _local_name(addr, cfg) is not None


def expand(cfg: Config, rcpts: list[str]) -> list[str]:
    """Recipients with local names replaced by their aliases (see module doc)."""
    try:
        table, _ = load(cfg)
    except Exception:  # never fail a submission over the aliases
        table = {}
    out: list[str] = []
    seen: set[str] = set()

    def qualify(a: str) -> str:
        return a if "@" in a else f"{a}@{cfg.hostname}"

    done: set[str] = set()  # names expanded already: their targets are in `out`

    def walk(addr: str, depth: int, path: frozenset[str]) -> None:
        name = _local_name(addr, cfg)
        if name is not None and name in table and name not in path and depth < MAX_DEPTH:
            # Each name once: lists that include each other made the walk follow every
            # path (exponential: one bounce held the event loop for hours).
            if name in done:
                return
            done.add(name)
            for t in table[name]:
                walk(t, depth + 1, path | {name})
            return
        q = qualify(addr)
        if q.lower() not in seen:
            seen.add(q.lower())
            out.append(q)

    for r in rcpts:
        walk(r, 0, frozenset())
    return out
