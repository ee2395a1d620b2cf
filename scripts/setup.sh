#!/usr/bin/env bash
# Idempotent set-up for the test suite on a fresh Debian machine with Rust: the system
# packages the Kafka client build needs (cmake, curl, and OpenSSL for librdkafka's TLS), and
# the services the integration tests talk to (PostgreSQL with ssl = on, MariaDB, Redis,
# RabbitMQ, NATS with JetStream, and tansu, a Kafka-protocol broker, on loopback), and
# Chromium with its WebDriver for the admin console's browser tests. The TLS tests also start redis-server and mariadbd instances of
# their own with certificates they make. Starts only what is not running.
set -euo pipefail

log() { printf '[setup] %s\n' "$*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

need_pkgs=()
command -v cmake >/dev/null 2>&1 || need_pkgs+=(cmake)
dpkg -s libcurl4-openssl-dev >/dev/null 2>&1 || need_pkgs+=(libcurl4-openssl-dev)
dpkg -s libssl-dev >/dev/null 2>&1 || need_pkgs+=(libssl-dev)
command -v pkg-config >/dev/null 2>&1 || need_pkgs+=(pkg-config)
dpkg -s ssl-cert >/dev/null 2>&1 || need_pkgs+=(ssl-cert)
command -v pg_ctlcluster >/dev/null 2>&1 || need_pkgs+=(postgresql)
command -v mariadbd >/dev/null 2>&1 || [ -x /usr/sbin/mariadbd ] || need_pkgs+=(mariadb-server)
command -v redis-server >/dev/null 2>&1 || need_pkgs+=(redis-server)
command -v rabbitmq-server >/dev/null 2>&1 || [ -x /usr/sbin/rabbitmq-server ] || need_pkgs+=(rabbitmq-server)
# The NATS JetStream publisher's tests run nats-server instances of their own.
command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || need_pkgs+=(nats-server)
# The admin console's real-browser tests (WebDriver).
command -v chromium >/dev/null 2>&1 || need_pkgs+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need_pkgs+=(chromium-driver)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing ${need_pkgs[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { # name port seconds
  local deadline=$((SECONDS + $3))
  until port_open "$2"; do
    [ $SECONDS -lt $deadline ] || { log "$1 did not open port $2 within $3 s"; return 1; }
    sleep 0.5
  done
  log "$1 is up on 127.0.0.1:$2"
}

if ! port_open 5432; then
  log "starting PostgreSQL"
  as_root pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start
fi
wait_port PostgreSQL 5432 60
# Tests make clusters of their own (outbox_test_<pid>_<n>_<port>) and drop them; one left by a
# killed run goes here. A cluster whose test process still runs is left alone.
for c in $(pg_lsclusters -h 2>/dev/null | awk '$2 ~ /^outbox_(restart|test)_/ {print $1 "/" $2}'); do
  pid=$(echo "${c#*/}" | sed -n 's/^outbox_test_\([0-9]*\)_.*/\1/p')
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    continue
  fi
  log "dropping leftover test cluster $c"
  as_root pg_dropcluster --stop "${c%/*}" "${c#*/}" || true
done
# The TLS tests connect with sslmode=require: Debian's server has ssl = on with the snakeoil
# certificate; turn it on (a reload, no restart) where it is off.
if [ "$(psql -h 127.0.0.1 -U postgres -d postgres -Atc 'show ssl' 2>/dev/null)" = "off" ] \
   && [ -r /etc/ssl/certs/ssl-cert-snakeoil.pem ]; then
  log "enabling TLS on PostgreSQL"
  psql -h 127.0.0.1 -U postgres -d postgres -qc "ALTER SYSTEM SET ssl_cert_file = '/etc/ssl/certs/ssl-cert-snakeoil.pem'" \
    -c "ALTER SYSTEM SET ssl_key_file = '/etc/ssl/private/ssl-cert-snakeoil.key'" \
    -c "ALTER SYSTEM SET ssl = on" -c "SELECT pg_reload_conf()" >/dev/null
fi
# The WAL relay's example and benchmark read a logical replication slot on this server:
# wal_level = logical (a restart, once).
if [ "$(psql -h 127.0.0.1 -U postgres -d postgres -Atc 'show wal_level' 2>/dev/null)" != "logical" ]; then
  log "setting wal_level = logical on PostgreSQL (restart)"
  psql -h 127.0.0.1 -U postgres -d postgres -qc "ALTER SYSTEM SET wal_level = logical" >/dev/null
  as_root pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main restart
  wait_port PostgreSQL 5432 60
fi
# A slot left by a killed example or benchmark run keeps WAL on disk: drop it.
psql -h 127.0.0.1 -U postgres -d test -Atqc "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
  WHERE NOT active AND slot_name LIKE 'outbox\_wal\_%'" >/dev/null || true

if ! port_open 3306; then
  log "starting MariaDB"
  as_root mkdir -p /run/mysqld && as_root chown mysql:mysql /run/mysqld 2>/dev/null || true
  as_root start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
fi
wait_port MariaDB 3306 60

if ! port_open 6379; then
  log "starting Redis"
  as_root redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
fi
wait_port Redis 6379 30

if ! port_open 5672; then
  log "starting RabbitMQ"
  as_root rabbitmq-server -detached
fi
wait_port RabbitMQ 5672 120

# NATS with JetStream for the nats_relay example (the publisher's tests run their own servers).
if ! port_open 4222; then
  log "starting NATS (JetStream)"
  nats_bin=$(command -v nats-server || echo /usr/sbin/nats-server)
  mkdir -p /tmp/outbox-nats-js
  nohup "$nats_bin" -a 127.0.0.1 -p 4222 -js -sd /tmp/outbox-nats-js >/tmp/outbox-nats.log 2>&1 &
fi
wait_port NATS 4222 30

# A real Kafka-protocol broker: tansu (no Debian package; built from crates.io once, about
# 14 minutes on 2 cores, then reused). The Kafka tests start brokers of their own with it;
# the one on 9092 serves the kafka_relay example.
TANSU_VERSION=0.6.0
if ! cargo install --list 2>/dev/null | grep -q "^tansu v$TANSU_VERSION:"; then
  log "installing tansu $TANSU_VERSION (once; about 14 minutes)"
  cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore --quiet
fi
if ! port_open 9092; then
  log "starting tansu (Kafka protocol, in-memory storage)"
  tansu_bin="$(dirname "$(command -v cargo)")/tansu"
  [ -x "$tansu_bin" ] || tansu_bin="$HOME/.cargo/bin/tansu"
  nohup "$tansu_bin" broker --listener-url tcp://127.0.0.1:9092 \
    --advertised-listener-url tcp://127.0.0.1:9092 --storage-engine memory://tansu/ \
    >/tmp/outbox-tansu.log 2>&1 &
fi
wait_port tansu 9092 30
