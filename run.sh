#!/usr/bin/env bash
# Install authrelay into ./.venv and run it. The first run writes ./authrelay.toml: the
# embedded default made explicit (state under ./var, a self-signed certificate made on
# first start, loopback listeners 127.0.0.1:2525 smtp, :2587 submission STARTTLS, :2465
# submissions), so every command run from this directory (authrelay user add ...,
# authrelay queue, authrelay sendmail) finds the same state as the server.
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
if [ ! -e authrelay.toml ]; then
    cat > authrelay.toml <<CONF
# Written by run.sh: authrelay's embedded default, made explicit. Every key: README.md.
state_dir = "$PWD/var"

[[listen]]
address = "127.0.0.1:2525"
mode = "smtp"

[[listen]]
address = "127.0.0.1:2587"
mode = "submission"

[[listen]]
address = "127.0.0.1:2465"
mode = "submissions"
CONF
    echo "run.sh: wrote $PWD/authrelay.toml" >&2
fi
echo "run.sh: the command is $PWD/.venv/bin/authrelay;" \
     "in another shell here: export PATH=\"$PWD/.venv/bin:\$PATH\"" >&2
exec .venv/bin/authrelay serve "$@"
