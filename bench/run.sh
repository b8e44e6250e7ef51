#!/usr/bin/env bash
# run.sh -- authrelay vs Postfix, side by side on this machine, one command:
#
#   sudo bash bench/run.sh            # full: 3 repetitions, ~25-40 minutes on 2 cores
#   sudo bash bench/run.sh --quick    # short normal mode (smaller counts), ~4-6 minutes
#   sudo bash bench/run.sh --smoke    # tiny counts, seconds (CI)
#   extra flags go to bench/scenarios.py: --reps N, --only abcef
#
# Installs what it needs (postfix, dovecot-core, smtp-source/smtp-sink from the postfix
# package, matplotlib, dnslib; chasquid, opensmtpd and opendkim unpacked from their .debs by
# bench/mta-peers.sh), starts the private Postfix peer (bench/postfix-peer.sh), authrelay
# (bench/authrelay-bench.toml in a temporary state_dir, free loopback ports, its own
# smtp-sink as smart host), chasquid, OpenSMTPD and OpenDKIM behind Postfix with
# authrelay's DKIM keys (bench/mta-peers.sh), runs the scenarios alternating the targets,
# writes bench/RESULTS.md, bench/results.json and bench/throughput.png, then stops what it
# started (by PID).
#
# Env: BENCH_AUTHRELAY_WORKERS=N sets authrelay's `workers` (default 0: one per core);
# BENCH_AUTHRELAY_LIMITS='pool_eviction = false' adds lines to its [limits] (a "before");
# BENCH_PEERS="chasquid opensmtpd opendkim" (default) picks the other peers ("" for none);
# BENCH_AUTHRELAY=0 runs the Postfix side only (also automatic when `authrelay serve`
# is not available); BENCH_KEEP_PEER=1 leaves the peers running afterwards;
# PY=python to use a particular interpreter (default: python3 with authrelay importable,
# else a venv in bench/.venv).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
[ "$(id -u)" = 0 ] || { echo "run.sh: run as root (Postfix needs it): sudo bash $0" >&2; exit 1; }
BENCH_AUTHRELAY="${BENCH_AUTHRELAY:-1}"
USER_NAME=alice
USER_PASS="correct horse"

# 1. packages and Python -----------------------------------------------------------
need=()
for p in postfix dovecot-core openssl iproute2 python3 python3-venv; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
PY="${PY:-python3}"
if ! "$PY" -c 'import authrelay, matplotlib, dnslib' 2>/dev/null; then
  if [ ! -x "$HERE/.venv/bin/python" ]; then python3 -m venv "$HERE/.venv"; fi
  PY="$HERE/.venv/bin/python"
  "$PY" -m pip install -q -e "$ROOT[bench]"
fi

# 10,000 idle connections need descriptors on both sides (servers inherit this limit)
hard="$(ulimit -Hn)"
if [ "$hard" = unlimited ] || [ "$hard" -ge 20000 ]; then ulimit -n 20000; else ulimit -n "$hard"; fi

# 2. the Postfix peer ------------------------------------------------------------------
STATE=""
AR_PID=""
SINK_PID=""
cleanup() {
  set +e
  if [ -n "$AR_PID" ]; then
    # authrelay runs in its own session (setsid): its id is $AR_PID, and the process
    # group holds everything it forked, even workers orphaned by a crashed parent
    kill -TERM -- "-$AR_PID" 2>/dev/null
    for _ in $(seq 100); do kill -0 -- "-$AR_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$AR_PID" 2>/dev/null
  fi
  if [ -n "$SINK_PID" ] && kill -0 "$SINK_PID" 2>/dev/null; then kill "$SINK_PID"; fi
  if [ "${BENCH_KEEP_PEER:-0}" != 1 ]; then
    PY="$PY" bash "$HERE/mta-peers.sh" stop-all >/dev/null
    bash "$HERE/postfix-peer.sh" stop >/dev/null
  fi
  [ -n "$STATE" ] && [ -d "$STATE" ] && rm -rf "$STATE"
}
trap cleanup EXIT
bash "$HERE/postfix-peer.sh" start
CERT=/var/lib/postfix-authrelay-bench/tls/cert.pem
KEY=/var/lib/postfix-authrelay-bench/tls/key.pem
TARGETS="$(mktemp /tmp/authrelay-bench-targets.XXXXXX.json)"
trap 'cleanup; rm -f "$TARGETS"' EXIT
PF_ENTRY='{"name": "postfix", "plain": '"${PF_PLAIN_PORT:-11025}"', "submission": '"${PF_SUB_PORT:-11587}"',
  "submissions": '"${PF_SUBS_PORT:-11465}"',
  "sink_out": "/run/authrelay-bench-postfix/sink.out",
  "pids_cmd": "bash '"$HERE"'/postfix-peer.sh pids"}'
PEER_ENTRIES=""
AR_ENTRY=""

# 3. authrelay -------------------------------------------------------------------------
free_ports() {  # N free loopback TCP ports
  "$PY" - "$1" <<'PYEOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PYEOF
}
wait_port() {
  for _ in $(seq 150); do ss -ltnH "sport = :$1" | grep -q LISTEN && return 0; sleep 0.1; done
  return 1
}
if [ "$BENCH_AUTHRELAY" = 1 ] && "$PY" -m authrelay serve --help >/dev/null 2>&1; then
  # same filesystem as Postfix's queue (/var), so both pay the same fsync
  STATE="$(mktemp -d /var/tmp/authrelay-bench.XXXXXX)"
  read -r AR_PLAIN AR_SUB AR_SUBS AR_SINK <<< "$(free_ports 4)"
  sed -e "s|@STATE@|$STATE|g" -e "s|@PLAIN_PORT@|$AR_PLAIN|g" -e "s|@SUB_PORT@|$AR_SUB|g" \
      -e "s|@SUBS_PORT@|$AR_SUBS|g" -e "s|@EXTRA_LIMITS@|${BENCH_AUTHRELAY_LIMITS:-}|g" \
      -e "s|@SINK_PORT@|$AR_SINK|g" -e "s|@CERT@|$CERT|g" -e "s|@KEY@|$KEY|g" \
      -e "s|@WORKERS@|${BENCH_AUTHRELAY_WORKERS:-0}|g" \
      "$HERE/authrelay-bench.toml" > "$STATE/authrelay.toml"
  CONF="$STATE/authrelay.toml"
  "$PY" -m authrelay -c "$CONF" check-config
  setsid smtp-sink -c -u nobody -h sink.bench.example.test "127.0.0.1:$AR_SINK" 1024 \
    > "$STATE/sink.out" 2>&1 < /dev/null &
  SINK_PID=$!
  # The sender addresses the scenarios use are alice's: an authenticated user's message is
  # DKIM-signed only when its From: is the user's (issue 17).
  printf '%s\n' "$USER_PASS" | "$PY" -m authrelay -c "$CONF" user add "$USER_NAME" --password-stdin \
    --address src@bench.example.test --address src@rsa.bench.example.test \
    --address src@ed25519.bench.example.test --address src@both.bench.example.test
  # (s) DKIM: keys for the sender domains scenario s uses (bench.example.test has none)
  if "$PY" -m authrelay dkim --help >/dev/null 2>&1; then
    for alg in rsa ed25519; do
      "$PY" -m authrelay -c "$CONF" dkim keygen "$alg.bench.example.test" --algorithm "$alg" \
        --selector bench >/dev/null 2>&1
    done
    "$PY" -m authrelay -c "$CONF" dkim keygen both.bench.example.test --selector bench \
      >/dev/null 2>&1
  fi
  setsid "$PY" -m authrelay -c "$CONF" serve > "$STATE/serve.log" 2>&1 < /dev/null &
  AR_PID=$!
  if wait_port "$AR_PLAIN" && wait_port "$AR_SUB" && wait_port "$AR_SUBS" && wait_port "$AR_SINK"; then
    echo "authrelay up: plain=127.0.0.1:$AR_PLAIN submission=127.0.0.1:$AR_SUB submissions=127.0.0.1:$AR_SUBS sink=$AR_SINK pid=$AR_PID"
    AR_ENTRY=', {"name": "authrelay", "plain": '"$AR_PLAIN"', "submission": '"$AR_SUB"',
   "submissions": '"$AR_SUBS"', "dkim": "off,rsa,ed25519,both",
   "sink_out": "'"$STATE"'/sink.out", "pids": ['"$AR_PID"'], "sid": '"$AR_PID"'}'
  else
    echo "run.sh: authrelay did not come up; Postfix side only. Its log:" >&2
    tail -20 "$STATE/serve.log" >&2 || true
  fi
else
  echo "run.sh: authrelay side off (BENCH_AUTHRELAY=0 or no 'authrelay serve'); Postfix only"
fi

# 4. the other peers ---------------------------------------------------------------------
# Each is optional: one that does not come up is reported and left out, the run goes on.
PEERS_RUN=/run/authrelay-bench-peers
for peer in ${BENCH_PEERS-chasquid opensmtpd opendkim}; do
  case "$peer" in
    opendkim)
      # the same keys authrelay signs with (scenario s needs the authrelay side for them)
      if [ -z "$STATE" ] || [ ! -d "$STATE/dkim" ]; then echo "run.sh: no DKIM keys, no OpenDKIM"; continue; fi
      if PY="$PY" OPENDKIM_KEYS="$STATE/dkim" bash "$HERE/mta-peers.sh" start opendkim; then
        PEER_ENTRIES+=', {"name": "postfix+opendkim", "plain": '"${PF_DKIM_RSA_PORT:-11027}"',
   "variant_ports": {"rsa": '"${PF_DKIM_RSA_PORT:-11027}"', "ed25519": '"${PF_DKIM_ED_PORT:-11028}"',
                     "both": '"${PF_DKIM_BOTH_PORT:-11029}"'},
   "submission": '"${PF_SUB_PORT:-11587}"', "scenarios": "s", "dkim": "rsa,ed25519,both",
   "sink_out": "/run/authrelay-bench-postfix/sink.out",
   "pids_cmd": "sh -c \"bash '"$HERE"'/postfix-peer.sh pids; bash '"$HERE"'/mta-peers.sh pids opendkim\""}'
      fi ;;
    chasquid)
      if PY="$PY" bash "$HERE/mta-peers.sh" start chasquid; then
        PEER_ENTRIES+=', {"name": "chasquid", "plain": '"${CHQ_PLAIN_PORT:-12025}"',
   "submission": '"${CHQ_SUB_PORT:-12587}"', "scenarios": "abc", "fsync": false,
   "caps": {"b": 100},
   "note": "(b) at most 100 sessions per run: it hashes passwords with scrypt (40-75 ms of CPU per session here)",
   "user": "src@bench.example.test", "sink_out": "'"$PEERS_RUN"'/chasquid/sink.out",
   "pids_cmd": "bash '"$HERE"'/mta-peers.sh pids chasquid"}'
      fi ;;
    opensmtpd)
      if PY="$PY" bash "$HERE/mta-peers.sh" start opensmtpd; then
        PEER_ENTRIES+=', {"name": "opensmtpd", "plain": '"${OSM_PLAIN_PORT:-13025}"',
   "submission": '"${OSM_SUB_PORT:-13587}"', "scenarios": "ac", "fsync": false,
   "note": "no (b): its TLS server fails with OpenSSL 3 (EVP lib; upstream #1171, #1239); at most 200 messages per run: its listen backlog of 5 drops connections from 10+ clients (1 s SYN retransmits) and it relays ~15 msg/s to the sink, so full counts took minutes per run",
   "caps": {"a": 200, "c": 200},
   "user": "src@bench.example.test", "sink_out": "'"$PEERS_RUN"'/opensmtpd/sink.out",
   "pids_cmd": "bash '"$HERE"'/mta-peers.sh pids opensmtpd"}'
      fi ;;
    *) echo "run.sh: unknown peer $peer" >&2 ;;
  esac
done
printf '[%s\n%s\n%s\n]\n' "$PF_ENTRY" "$PEER_ENTRIES" "$AR_ENTRY" > "$TARGETS"
"$PY" -c 'import json, sys; print("targets:", [t["name"] for t in json.load(open(sys.argv[1]))])' "$TARGETS"

# 5. the scenarios -----------------------------------------------------------------------
set +e
"$PY" "$HERE/scenarios.py" --targets "$TARGETS" "$@"
rc=$?
set -e
echo "run.sh: done (exit $rc); results in bench/ (smoke: /tmp/authrelay-bench-smoke/)"
exit $rc
