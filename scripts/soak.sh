#!/usr/bin/env bash
# The SIGKILL soak: relay processes killed with SIGKILL at random moments (every 0.3-0.7 s)
# while a producer commits keep-order messages on 6 keys (one poisoned, its Redis key of the
# wrong type, until it is healed at 60% of the kills) and publish-on-commit messages, on
# SQLite, PostgreSQL and MariaDB, publishing to Redis. Prints per store: committed,
# published entries, kills, duplicates (and per kill), order violations, lost.
#
#   bash scripts/soak.sh                 # 100 kills per store, 3 relay processes (~5 min)
#   KILLS=300 RELAYS=4 bash scripts/soak.sh
#   bash scripts/soak.sh --history       # whole-history checks instead: RUNS seeded runs
#   RUNS=50 SECS=20 SEED=7 bash scripts/soak.sh --history   # per store (tests/history.rs)
#
# CI runs the same test with 8 kills (`cargo test -p outbox-cli --test kill`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OUTBOX_PG_URL="${OUTBOX_PG_URL:-postgres://postgres@127.0.0.1:5432/test}"
export OUTBOX_MYSQL_URL="${OUTBOX_MYSQL_URL:-mysql://root@127.0.0.1:3306/test}"
export OUTBOX_REDIS_URL="${OUTBOX_REDIS_URL:-redis://127.0.0.1:6379/}"
if [ "${1:-}" = "--history" ]; then
  export OUTBOX_HISTORY_RUNS="${RUNS:-20}" OUTBOX_HISTORY_SECS="${SECS:-15}"
  export OUTBOX_HISTORY_SEED="${SEED:-$(date +%s)}"
  echo "whole histories: $OUTBOX_HISTORY_RUNS runs of ${OUTBOX_HISTORY_SECS} s per store from seed $OUTBOX_HISTORY_SEED"
  exec cargo test --all-features --test history -- --nocapture --test-threads=1
fi
export OUTBOX_SOAK_KILLS="${KILLS:-100}"
export OUTBOX_SOAK_RELAYS="${RELAYS:-3}"
# One store at a time (not the test suite's parallelism): each store's kills and duplicates
# are its own, and two cores are not shared by three stores' relays.
cargo test -p outbox-cli --test kill -- --nocapture --test-threads=1 2>&1 \
  | grep -E '^\[(sqlite|postgres|mariadb)\] SIGKILL soak|^test |test result'
