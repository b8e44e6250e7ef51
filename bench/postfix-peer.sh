#!/usr/bin/env bash
# postfix-peer.sh -- a private Postfix + Dovecot-SASL instance on loopback, the reference
# peer for bench/run.sh. Self-contained: installs packages from apt, writes its own config
# (from bench/peer/*), runs beside any system Postfix without touching /etc/postfix.
#
#   bash bench/postfix-peer.sh start    # install if needed, configure, start, wait for ports
#   bash bench/postfix-peer.sh stop     # stop what start started (PID files), keep packages
#   bash bench/postfix-peer.sh status   # exit 0 when up; prints the ports
#   bash bench/postfix-peer.sh pids     # root PIDs of the server trees: postfix master, dovecot
#   bash bench/postfix-peer.sh clean    # stop, then delete the instance's queue/config/data
#
# Ports (127.0.0.1 only; env overrides):
#   PF_PLAIN_PORT=11025   plain SMTP, relay for mynetworks=127.0.0.0/8 without AUTH
#   PF_SUB_PORT=11587     submission: STARTTLS required, AUTH PLAIN/LOGIN via Dovecot
#   PF_SUBS_PORT=11465    submissions: TLS on connect (smtpd_tls_wrappermode=yes), AUTH
#   PF_DKIM_RSA_PORT=11027, PF_DKIM_ED_PORT=11028, PF_DKIM_BOTH_PORT=11029: plain as 11025,
#                         every message through OpenDKIM's RSA instance, its Ed25519 one, or
#                         both in a row (milters at OPENDKIM_DIR/{rsa,ed25519}.sock, started
#                         by bench/mta-peers.sh; 4xx without them)
#   PF_SINK_PORT=11026    smtp-sink: the relayhost ("the Internet"); counts in $PF_RUN/sink.out
# User: PF_USER=alice, PF_PASS="correct horse". Must run as root (Postfix needs it).
# Certificate: $PF_DATA/tls/{cert,key}.pem, ECDSA P-256 (PF_CERT_TYPE=rsa for RSA 2048);
# run.sh gives authrelay the same certificate so both pay the same handshake.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PF_PLAIN_PORT="${PF_PLAIN_PORT:-11025}"
PF_SUB_PORT="${PF_SUB_PORT:-11587}"
PF_SUBS_PORT="${PF_SUBS_PORT:-11465}"
PF_SINK_PORT="${PF_SINK_PORT:-11026}"
PF_DKIM_RSA_PORT="${PF_DKIM_RSA_PORT:-11027}"
PF_DKIM_ED_PORT="${PF_DKIM_ED_PORT:-11028}"
PF_DKIM_BOTH_PORT="${PF_DKIM_BOTH_PORT:-11029}"
OPENDKIM_DIR="${OPENDKIM_DIR:-/run/authrelay-bench-peers/opendkim}"
PF_USER="${PF_USER:-alice}"
PF_PASS="${PF_PASS:-correct horse}"
PF_CERT_TYPE="${PF_CERT_TYPE:-ecdsa}"
PF_CONF=/etc/postfix-authrelay-bench
PF_QUEUE=/var/spool/postfix-authrelay-bench
PF_DATA=/var/lib/postfix-authrelay-bench
PF_RUN=/run/authrelay-bench-postfix
PF_LOG=/var/log/postfix-authrelay-bench.log
DOVE_RUN=/run/authrelay-bench-dovecot
DOVE_CONF="$PF_DATA/dovecot/dovecot.conf"

die() { echo "postfix-peer: $*" >&2; exit 1; }
# The daemons started here outlive the caller: they must not inherit its descriptors
# (under `flock /tmp/authrelay-bench.lock` the lock's descriptor would keep the lock held
# for as long as Dovecot and smtp-sink run, and every other bench run would wait forever).
for _fd in /proc/$$/fd/*; do
  _n="${_fd##*/}"
  if [ "$_n" -gt 2 ] && [ "$_n" -lt 255 ]; then eval "exec $_n>&-" 2>/dev/null || true; fi
done
[ "$(id -u)" = 0 ] || die "must run as root (Postfix and Dovecot need it)"

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
master_pid() { local f="$PF_QUEUE/pid/master.pid"; [ -s "$f" ] && tr -d ' ' < "$f"; }
listening() { ss -ltnH "sport = :$1" | grep -q LISTEN; }

install_packages() {
  local need=() p
  for p in postfix dovecot-core swaks openssl iproute2; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
  done
  [ ${#need[@]} -eq 0 ] && return 0
  # "No configuration": the distro instance stays unconfigured; we run our own.
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
}

render() {  # render TEMPLATE DEST: fill @VARS@
  sed -e "s|@QUEUE@|$PF_QUEUE|g" -e "s|@DATA@|$PF_DATA|g" -e "s|@LOG@|$PF_LOG|g" \
      -e "s|@SINK_PORT@|$PF_SINK_PORT|g" -e "s|@PLAIN_PORT@|$PF_PLAIN_PORT|g" \
      -e "s|@SUB_PORT@|$PF_SUB_PORT|g" -e "s|@DKIM_RSA_PORT@|$PF_DKIM_RSA_PORT|g" \
      -e "s|@DKIM_ED_PORT@|$PF_DKIM_ED_PORT|g" -e "s|@DKIM_BOTH_PORT@|$PF_DKIM_BOTH_PORT|g" \
      -e "s|@DKIM_DIR@|$OPENDKIM_DIR|g" -e "s|@SUBS_PORT@|$PF_SUBS_PORT|g" \
      -e "s|@CERT@|$PF_DATA/tls/cert.pem|g" \
      -e "s|@KEY@|$PF_DATA/tls/key.pem|g" -e "s|@DOVE_RUN@|$DOVE_RUN|g" \
      -e "s|@DOVE_LOG@|$PF_DATA/dovecot/dovecot.log|g" \
      -e "s|@DOVE_USERS@|$PF_DATA/dovecot/users|g" "$1" > "$2"
}

make_cert() {
  local tls="$PF_DATA/tls"
  mkdir -p "$tls"
  [ -s "$tls/cert.pem" ] && [ -s "$tls/key.pem" ] && return 0
  local key=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1)
  [ "$PF_CERT_TYPE" = rsa ] && key=(-newkey rsa:2048)
  openssl req -x509 "${key[@]}" -nodes -days 3650 -subj "/CN=bench.example.test" \
    -addext "subjectAltName=DNS:bench.example.test,DNS:localhost,IP:127.0.0.1" \
    -keyout "$tls/key.pem" -out "$tls/cert.pem" 2>/dev/null
  chmod 600 "$tls/key.pem"; chmod 644 "$tls/cert.pem"
}

start() {
  install_packages
  # A distro-managed Postfix is not ours: leave it running, our ports and dirs differ.
  mkdir -p "$PF_CONF" "$PF_DATA/dovecot" "$PF_RUN" "$PF_QUEUE"
  make_cert
  render "$HERE/peer/main.cf" "$PF_CONF/main.cf"
  render "$HERE/peer/master.cf" "$PF_CONF/master.cf"
  chmod 644 "$PF_CONF/main.cf" "$PF_CONF/master.cf"
  chown postfix "$PF_DATA"
  touch "$PF_LOG"
  # 'postfix check' creates the queue dirs with Postfix's own ownership and modes
  postfix -c "$PF_CONF" check

  # Dovecot: auth only, its own instance (base_dir) so a distro Dovecot never clashes
  render "$HERE/peer/dovecot.conf" "$DOVE_CONF"
  local hash; hash="$(doveadm -c "$DOVE_CONF" pw -s SHA512-CRYPT -p "$PF_PASS")"
  ( umask 027; printf '%s:%s::::::\n' "$PF_USER" "$hash" > "$PF_DATA/dovecot/users" )
  chown root:dovecot "$PF_DATA/dovecot/users"
  if alive "$DOVE_RUN/master.pid"; then
    doveadm -c "$DOVE_CONF" reload
  else
    dovecot -c "$DOVE_CONF"
  fi

  # the sink: smtp-sink with running counters (-c); 1024 = listen backlog
  if ! alive "$PF_RUN/sink.pid"; then
    setsid smtp-sink -c -u nobody -h sink.bench.example.test "127.0.0.1:$PF_SINK_PORT" 1024 \
      > "$PF_RUN/sink.out" 2>&1 < /dev/null &
    echo $! > "$PF_RUN/sink.pid"
  fi

  if postfix -c "$PF_CONF" status >/dev/null 2>&1; then
    postfix -c "$PF_CONF" reload
  else
    postfix -c "$PF_CONF" start
  fi

  local i ok=0
  for i in $(seq 100); do
    ok=1
    for p in "$PF_PLAIN_PORT" "$PF_SUB_PORT" "$PF_SUBS_PORT" "$PF_SINK_PORT"; do
      listening "$p" || ok=0
    done
    [ -S "$PF_QUEUE/private/auth" ] || ok=0
    [ $ok = 1 ] && break
    sleep 0.1
  done
  [ $ok = 1 ] || die "did not come up; see $PF_LOG and $PF_DATA/dovecot/dovecot.log"
  status
}

stop() {
  if postfix -c "$PF_CONF" status >/dev/null 2>&1; then postfix -c "$PF_CONF" stop; fi
  if alive "$DOVE_RUN/master.pid"; then
    doveadm -c "$DOVE_CONF" stop 2>/dev/null || kill "$(cat "$DOVE_RUN/master.pid")"
  fi
  if alive "$PF_RUN/sink.pid"; then kill "$(cat "$PF_RUN/sink.pid")"; fi
  rm -f "$PF_RUN/sink.pid"
  local i busy
  for i in $(seq 50); do
    busy=0
    for p in "$PF_PLAIN_PORT" "$PF_SUB_PORT" "$PF_SUBS_PORT" "$PF_SINK_PORT"; do
      listening "$p" && busy=1
    done
    [ $busy = 0 ] && break
    sleep 0.1
  done
  echo "postfix-peer: stopped"
}

status() {
  postfix -c "$PF_CONF" status >/dev/null 2>&1 || { echo "postfix-peer: down"; return 1; }
  echo "postfix-peer: up plain=127.0.0.1:$PF_PLAIN_PORT submission=127.0.0.1:$PF_SUB_PORT" \
       "submissions=127.0.0.1:$PF_SUBS_PORT" \
       "sink=127.0.0.1:$PF_SINK_PORT sink_out=$PF_RUN/sink.out user=$PF_USER" \
       "cert=$PF_DATA/tls/cert.pem queue=$PF_QUEUE"
}

pids() {  # the roots of the server process trees (CPU and RSS are summed over them)
  local m; m="$(master_pid)" || die "postfix not running"
  echo "$m"
  alive "$DOVE_RUN/master.pid" && cat "$DOVE_RUN/master.pid"
  return 0
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  pids) pids ;;
  clean) stop; rm -rf "$PF_CONF" "$PF_QUEUE" "$PF_DATA" "$PF_RUN" "$DOVE_RUN" "$PF_LOG" ;;
  *) echo "usage: $0 start|stop|status|pids|clean" >&2; exit 2 ;;
esac
