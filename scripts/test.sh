#!/usr/bin/env bash
# The test command: set up what the tests need, then run every test of every crate with
# every backend, against the real services on loopback. No test is skipped: a missing
# service fails its tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OUTBOX_PG_URL="${OUTBOX_PG_URL:-postgres://postgres@127.0.0.1:5432/test}"
export OUTBOX_MYSQL_URL="${OUTBOX_MYSQL_URL:-mysql://root@127.0.0.1:3306/test}"
export OUTBOX_REDIS_URL="${OUTBOX_REDIS_URL:-redis://127.0.0.1:6379/}"
export OUTBOX_AMQP_URL="${OUTBOX_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
cargo test --workspace --all-features "$@"

# Every example runs and exits 0.
for example in quickstart custom_publisher custom_strategy "postgres_relay --features postgres" "wal_relay --features pg-wal" "many_databases --features any" "redis_relay --features redis" \
               "rabbitmq_relay --features amqp" "nats_relay --features nats" "webhook_relay --features webhook" \
               "kafka_relay --features kafka" "inbox_consumer --features kafka"; do
  # shellcheck disable=SC2086
  cargo run -q --example $example >/dev/null
  echo "example ran: $example"
done
# And the Kafka example against the real broker (tansu) that setup.sh runs.
KAFKA_BOOTSTRAP=127.0.0.1:9092 cargo run -q --example kafka_relay --features kafka >/dev/null
echo "example ran: kafka_relay against tansu on 127.0.0.1:9092"
