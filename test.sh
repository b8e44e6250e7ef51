#!/usr/bin/env bash
# Install what the tests need (Debian packages + Python packages) and run the whole suite.
# Usage: sudo ./test.sh [pytest args]     (needs root for apt-get; CI runs it as root)
set -euo pipefail
cd "$(dirname "$0")"

APT_PKGS=(swaks msmtp curl openssl sasl2-bin dovecot-core
          mutt s-nail git-email libmailtools-perl  # the MUAs of test_mua_clients.py; git send-email
                                                   # needs Mail::Address, which git-email only recommends
          libnet-ssleay-perl libio-socket-ssl-perl libauthen-sasl-perl python3-venv python3-pip
          haproxy postgresql redis-server
          opendkim-tools   # opendkim-testkey: an independent check of our DKIM keys + records
          opendkim         # opendkim -t: OpenDKIM's verifier checks our signatures (tests/dkimcheck.py)
          bind9 bind9-utils bind9-dnsutils unbound  # DANE rig: signed zone + validating resolver
          gcc libc6-dev  # the hung-fsync shim of support/hungfsync.py (LD_PRELOAD)
          e2fsprogs  # mkfs.ext4: the frozen-spool tests' loop-mounted ext4 (support/tmpfs.py)
          fail2ban)  # fail2ban-regex: the documented filter against forged maillog values
missing=()
for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# dovecot-core's package scripts may start a system dovecot, redis-server and postgresql
# their system instances (fail2ban and opendkim their services); the tests run their own
# on free loopback ports, and use only fail2ban's fail2ban-regex and `opendkim -t`.

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test,scale]'
.venv/bin/ruff check src tests bench
.venv/bin/mypy  # strict on the package ([tool.mypy] in pyproject.toml)
exec .venv/bin/python -m pytest -q -rs "$@"  # -rs: every skip is listed with its reason
