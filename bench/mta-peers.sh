#!/usr/bin/env bash
# mta-peers.sh -- the other peers of bench/run.sh beside Postfix: chasquid 1.11, OpenSMTPD 6.8
# and OpenDKIM 2.11 (the milter behind the Postfix peer for the signed scenario (s)), each a
# private instance on loopback. Their Debian packages conflict with Postfix's (chasquid,
# opensmtpd) or would start a system service (opendkim), so the .debs are fetched with
# `apt-get download` and unpacked (dpkg-deb -x) under $PEERS_ROOT; only their libraries come
# from apt. chasquid and OpenSMTPD run in their own mount namespace (unshare -m), with
# private files bind-mounted over the system paths they assume (/etc/resolv.conf;
# OpenSMTPD's /var/spool/smtpd, /var/lib/opensmtpd/empty, /usr/libexec/opensmtpd, /run).
#
#   bash bench/mta-peers.sh start chasquid|opensmtpd|opendkim   # install if needed, start
#   bash bench/mta-peers.sh stop  chasquid|opensmtpd|opendkim   # stop what start started
#   bash bench/mta-peers.sh pids  chasquid|opensmtpd|opendkim   # root PIDs of its tree
#   bash bench/mta-peers.sh stop-all                            # every peer, and the DNS
#
# Every process started here is recorded in $PEERS_RUN/*.pid and stopped by that PID.
# Both MTAs look names up for every message (chasquid: SPF of the sender, the next hop's
# MX and A, MTA-STS; OpenSMTPD: the client's reverse name), so they get a loopback DNS
# server answering from memory at once (bench/dnsserver.py on $PEERS_DNS:53; needs
# PY with dnslib, default python3).
#
# Ports (127.0.0.1; env overrides), each MTA with its own smtp-sink as "the Internet":
#   chasquid   CHQ_PLAIN_PORT=12025  CHQ_SUB_PORT=12587  CHQ_SINK_PORT=12026
#   opensmtpd  OSM_PLAIN_PORT=13025  OSM_SUB_PORT=13587  OSM_SINK_PORT=13026
#   opendkim   $PEERS_RUN/opendkim/{rsa,ed25519}.sock: OpenDKIM 2.11 signs with one
#              algorithm per instance (SignatureAlgorithm), so two instances, the RSA keys
#              in one, the Ed25519 keys in the other; the Postfix peer's PF_DKIM_*_PORT
#              listeners use one or both. Keys from OPENDKIM_KEYS=DIR laid out as
#              authrelay's state_dir/dkim: DOMAIN/SELECTOR.key (PEM), the same keys.
# The plain port relays for 127.0.0.0/8 to sink@remote.example.net: OpenSMTPD by
# `match from local`; chasquid relays only for authenticated users, so remote.example.net
# is a local domain of it whose alias `sink` forwards to sink@sink.bench.example.test
# (MX -> 127.0.0.1, port CHQ_SINK_PORT by chasquid's -testing__outgoing_smtp_port).
# Submission: STARTTLS + AUTH PLAIN as src@bench.example.test / "correct horse" (chasquid
# wants user@domain). The certificate is the Postfix peer's (PEERS_CERT, PEERS_KEY).
# Neither chasquid nor OpenSMTPD fsyncs its queue before the 250 (Postfix and authrelay do).
# OpenSMTPD 6.8 as packaged for Debian 12 cannot serve TLS with OpenSSL 3 ("EVP lib",
# upstream issues #1171/#1239): it runs plain scenarios only. Its listen backlog is 5.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PEERS_ROOT="${PEERS_ROOT:-/var/lib/authrelay-bench-peers}"
PEERS_RUN="${PEERS_RUN:-/run/authrelay-bench-peers}"
PEERS_DNS="${PEERS_DNS:-127.0.53.53}"
PEERS_CERT="${PEERS_CERT:-/var/lib/postfix-authrelay-bench/tls/cert.pem}"
PEERS_KEY="${PEERS_KEY:-/var/lib/postfix-authrelay-bench/tls/key.pem}"
PY="${PY:-python3}"
CHQ_PLAIN_PORT="${CHQ_PLAIN_PORT:-12025}"; CHQ_SUB_PORT="${CHQ_SUB_PORT:-12587}"
CHQ_SINK_PORT="${CHQ_SINK_PORT:-12026}"
OSM_PLAIN_PORT="${OSM_PLAIN_PORT:-13025}"; OSM_SUB_PORT="${OSM_SUB_PORT:-13587}"
OSM_SINK_PORT="${OSM_SINK_PORT:-13026}"
OPENDKIM_SOCKET="${OPENDKIM_SOCKET:-$PEERS_RUN/opendkim/opendkim.sock}"
BIN="$PEERS_ROOT/root"
USER_ADDR=src@bench.example.test
USER_PASS="correct horse"

die() { echo "mta-peers: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (namespaces, ports, OpenSMTPD's privilege separation)"
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
listening() { ss -ltnH "sport = :$1" | grep -q LISTEN; }
wait_for() {  # wait_for WHAT TEST...: up to 15 s
  local what="$1" i; shift
  for i in $(seq 150); do "$@" && return 0; sleep 0.1; done
  die "$what did not come up"
}

install() {  # the three .debs unpacked under $BIN, their libraries from apt
  local pkgs=(chasquid opensmtpd opendkim) p deps=() need=()
  mkdir -p "$PEERS_ROOT/debs"
  for p in "${pkgs[@]}"; do
    if ! ls "$PEERS_ROOT/debs/${p}_"*.deb >/dev/null 2>&1; then
      ( cd "$PEERS_ROOT/debs" && apt-get download "$p" >/dev/null 2>&1 ) ||
        { apt-get update -qq && ( cd "$PEERS_ROOT/debs" && apt-get download "$p" >/dev/null ); }
    fi
  done
  if [ ! -x "$BIN/usr/bin/chasquid" ] || [ ! -x "$BIN/usr/sbin/smtpd" ] ||
     [ ! -x "$BIN/usr/sbin/opendkim" ]; then
    for p in "${pkgs[@]}"; do dpkg-deb -x "$PEERS_ROOT/debs/${p}_"*.deb "$BIN"; done
  fi
  # their run-time libraries (Depends: without versions and alternatives)
  for p in "${pkgs[@]}"; do
    mapfile -t -O "${#deps[@]}" deps < <(dpkg-deb -f "$PEERS_ROOT/debs/${p}_"*.deb Depends |
      tr ',' '\n' | sed -e 's/(.*)//' -e 's/|.*//' -e 's/ //g' | grep -v '^$')
  done
  for p in $(printf '%s\n' "${deps[@]}" | sort -u); do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
  done
  if [ ${#need[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" \
      >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y \
      -qq --no-install-recommends "${need[@]}" >/dev/null; }
  fi
  # OpenSMTPD drops privileges to these (as its postinst makes them)
  for p in opensmtpd opensmtpq; do
    getent group "$p" >/dev/null || addgroup --system "$p" >/dev/null
    id "$p" >/dev/null 2>&1 || adduser --system --home /var/lib/opensmtpd/empty \
      --no-create-home --disabled-password --ingroup "$p" "$p" >/dev/null 2>&1
  done
}

dns_start() {
  mkdir -p "$PEERS_RUN"
  alive "$PEERS_RUN/dns.pid" && return 0
  "$PY" -c 'import dnslib' 2>/dev/null || die "$PY lacks dnslib (pip install dnslib)"
  rm -f "$PEERS_RUN/dns.pid"
  setsid "$PY" "$HERE/dnsserver.py" --address "$PEERS_DNS" --port 53 \
    --domain bench.example.test --domain remote.example.net --pidfile "$PEERS_RUN/dns.pid" \
    > "$PEERS_RUN/dns.log" 2>&1 < /dev/null &
  wait_for "the peers' DNS server" test -s "$PEERS_RUN/dns.pid"
  echo "nameserver $PEERS_DNS" > "$PEERS_RUN/resolv.conf"
}

sink_start() {  # sink_start NAME PORT
  local run="$PEERS_RUN/$1"
  mkdir -p "$run"
  alive "$run/sink.pid" && return 0
  setsid smtp-sink -c -u nobody -h sink.bench.example.test "127.0.0.1:$2" 1024 \
    > "$run/sink.out" 2>&1 < /dev/null &
  echo $! > "$run/sink.pid"
}

chasquid_start() {
  local run="$PEERS_RUN/chasquid" base="$PEERS_ROOT/chasquid"
  alive "$run/pid" && return 0
  rm -rf "$base"
  mkdir -p "$base/conf/certs/bench.example.test" "$base/conf/domains/bench.example.test" \
    "$base/conf/domains/remote.example.net" "$base/data" "$run"
  cp "$PEERS_CERT" "$base/conf/certs/bench.example.test/fullchain.pem"
  cp "$PEERS_KEY" "$base/conf/certs/bench.example.test/privkey.pem"
  cat > "$base/conf/chasquid.conf" <<EOF
hostname: "chasquid.bench.example.test"
smtp_address: "127.0.0.1:$CHQ_PLAIN_PORT"
submission_address: "127.0.0.1:$CHQ_SUB_PORT"
data_dir: "$base/data"
mail_log_path: "$run/mail.log"
EOF
  echo "sink: sink@sink.bench.example.test" > "$base/conf/domains/remote.example.net/aliases"
  "$BIN/usr/bin/chasquid-util" -C="$base/conf" user-add "$USER_ADDR" \
    --password="$USER_PASS" >/dev/null
  sink_start chasquid "$CHQ_SINK_PORT"
  # no hooks/post-data in the config: no filter process per message
  setsid unshare -m sh -c "mount --bind '$PEERS_RUN/resolv.conf' /etc/resolv.conf && exec \
'$BIN/usr/bin/chasquid' -config_dir '$base/conf' -logfile '$run/chasquid.log' \
-testing__outgoing_smtp_port $CHQ_SINK_PORT" > "$run/out" 2>&1 < /dev/null &
  echo $! > "$run/pid"  # sh execs chasquid: the same PID
  wait_for chasquid listening "$CHQ_PLAIN_PORT"
  wait_for chasquid listening "$CHQ_SUB_PORT"
}

opensmtpd_start() {
  local run="$PEERS_RUN/opensmtpd" base="$PEERS_ROOT/opensmtpd"
  alive "$run/pid" && return 0
  rm -rf "$base"
  mkdir -p "$base/spool" "$base/empty" "$base/conf" "$run"
  chmod 711 "$base/spool"
  printf '%s %s\n' "$USER_ADDR" "$(openssl passwd -6 "$USER_PASS")" > "$base/conf/creds"
  chmod 640 "$base/conf/creds"
  cat > "$base/conf/smtpd.conf" <<EOF
pki bench cert "$PEERS_CERT"
pki bench key "$PEERS_KEY"
table creds file:$base/conf/creds
listen on 127.0.0.1 port $OSM_PLAIN_PORT hostname opensmtpd.bench.example.test
listen on 127.0.0.1 port $OSM_SUB_PORT tls-require pki bench auth <creds> hostname opensmtpd.bench.example.test
action "relay" relay host smtp://127.0.0.1:$OSM_SINK_PORT
match from local for any action "relay"
match auth from any for any action "relay"
EOF
  sink_start opensmtpd "$OSM_SINK_PORT"
  # mount points for the binds (empty directories; the binds live only in the namespace)
  mkdir -p /var/spool/smtpd /var/lib/opensmtpd/empty /usr/libexec/opensmtpd
  cat > "$base/ns.sh" <<EOF
set -e
mount --bind '$PEERS_RUN/resolv.conf' /etc/resolv.conf
mount --bind '$base/spool' /var/spool/smtpd
mount --bind '$base/empty' /var/lib/opensmtpd/empty
mount --bind '$BIN/usr/libexec/opensmtpd' /usr/libexec/opensmtpd
mount -t tmpfs tmpfs /run
exec '$BIN/usr/sbin/smtpd' -f '$base/conf/smtpd.conf' -d
EOF
  setsid unshare -m sh "$base/ns.sh" > "$run/out" 2>&1 < /dev/null &
  echo $! > "$run/pid"  # sh execs smtpd: the same PID
  wait_for opensmtpd listening "$OSM_PLAIN_PORT"
}

opendkim_start() {  # two instances: OpenDKIM 2.11 signs with one algorithm per instance
  local run="$PEERS_RUN/opendkim" base="$PEERS_ROOT/opendkim" keys="${OPENDKIM_KEYS:-}"
  local f d s alg n=0
  alive "$run/rsa.pid" && alive "$run/ed25519.pid" && return 0
  [ -n "$keys" ] && [ -d "$keys" ] || die "OPENDKIM_KEYS=DIR (DOMAIN/SELECTOR.key) is required"
  rm -rf "$base"
  mkdir -p "$base" "$run"
  for alg in rsa ed25519; do : > "$base/$alg.KeyTable"; : > "$base/$alg.SigningTable"; done
  for f in "$keys"/*/*.key; do
    [ -e "$f" ] || continue
    d="$(basename "$(dirname "$f")")"; s="$(basename "$f" .key)"; n=$((n + 1))
    if openssl pkey -in "$f" -noout -text 2>/dev/null | head -1 | grep -qi ed25519; then
      alg=ed25519; else alg=rsa; fi
    echo "k$n $d:$s:$f" >> "$base/$alg.KeyTable"
    echo "*@$d k$n" >> "$base/$alg.SigningTable"
  done
  [ "$n" -gt 0 ] || die "no keys under $keys"
  for alg in rsa ed25519; do
    # as authrelay signs: relaxed/relaxed, every key of the From: domain
    cat > "$base/$alg.conf" <<EOF
Syslog no
Background no
Mode s
Socket local:$run/$alg.sock
PidFile $run/$alg.opendkim.pid
UMask 000
Canonicalization relaxed/relaxed
SignatureAlgorithm $alg-sha256
KeyTable file:$base/$alg.KeyTable
SigningTable refile:$base/$alg.SigningTable
MultipleSignatures yes
RequireSafeKeys no
EOF
    rm -f "$run/$alg.sock"
    setsid "$BIN/usr/sbin/opendkim" -f -x "$base/$alg.conf" > "$run/$alg.out" 2>&1 < /dev/null &
    echo $! > "$run/$alg.pid"
    wait_for "opendkim ($alg)" test -S "$run/$alg.sock"
  done
}

stop_one() {  # stop_one NAME: the daemon(s), then its sink, by their PID files
  local run="$PEERS_RUN/$1" f i
  for f in "$run/pid" "$run/rsa.pid" "$run/ed25519.pid" "$run/sink.pid"; do
    if alive "$f"; then
      kill -TERM "$(cat "$f")"
      for i in $(seq 50); do alive "$f" || break; sleep 0.1; done
      alive "$f" && kill -KILL "$(cat "$f")"
    fi
    rm -f "$f"
  done
  return 0
}

case "${1:-}" in
  start)
    install
    case "${2:-}" in
      chasquid) dns_start; chasquid_start ;;
      opensmtpd) dns_start; opensmtpd_start ;;
      opendkim) opendkim_start ;;
      *) die "start chasquid|opensmtpd|opendkim" ;;
    esac
    echo "mta-peers: $2 up" ;;
  stop) stop_one "${2:?stop NAME}" ;;
  pids)
    if [ "${2:?pids NAME}" = opendkim ]; then cat "$PEERS_RUN/opendkim/rsa.pid" \
      "$PEERS_RUN/opendkim/ed25519.pid"; exit 0; fi
    alive "$PEERS_RUN/$2/pid" || die "$2 not running"; cat "$PEERS_RUN/$2/pid" ;;
  stop-all)
    for p in chasquid opensmtpd opendkim; do stop_one "$p"; done
    if alive "$PEERS_RUN/dns.pid"; then kill -TERM "$(cat "$PEERS_RUN/dns.pid")"; fi
    rm -f "$PEERS_RUN/dns.pid"
    echo "mta-peers: stopped" ;;
  *) echo "usage: $0 start|stop|pids NAME | stop-all" >&2; exit 2 ;;
esac
