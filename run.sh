#!/usr/bin/env bash
# Install authrelay into ./.venv and run it on its embedded default configuration:
# state under ./var, a self-signed certificate made on first start, loopback listeners
# 127.0.0.1:2525 (smtp), :2587 (submission, STARTTLS), :2465 (submissions, implicit TLS).
# Usage: ./run.sh [serve options]   (sudo the first time on a machine without python3-venv)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if ! "$PY" -m venv --help >/dev/null 2>&1 || ! "$PY" -c 'import ensurepip' 2>/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq python3-venv python3-pip >/dev/null
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e .
exec .venv/bin/authrelay serve "$@"
