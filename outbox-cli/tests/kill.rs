//! Relay processes killed with SIGKILL at random moments while producers keep committing, on
//! SQLite, PostgreSQL and MariaDB, publishing to the real Redis: every committed message is
//! published at least once, duplicates stay within one batch per kill, and keep-order keys
//! keep their order, a poisoned key included once it heals.
//!
//! The same test is the soak (`scripts/soak.sh`): `OUTBOX_SOAK_KILLS` kills per store
//! (default 8, the CI run) with `OUTBOX_SOAK_RELAYS` relay processes (default 2).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outbox_core::conformance::eventually;
use outbox_core::{KeepOrder, Message, Outbox, PublishOnCommit, Store, StoreAdmin};
use outbox_redis::redis::{self, AsyncCommands};
use outbox_redis::RedisPublisher;
use outbox_sql::mysql::{MySqlOptions, MySqlStore};
use outbox_sql::postgres::{PgOptions, PgStore};
use outbox_sqlite::SqliteStore;
use rand::{Rng, SeedableRng};

const BATCH: usize = 20;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn redis_url() -> String {
    std::env::var("OUTBOX_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into())
}

enum Producer {
    Sqlite(SqliteStore),
    Pg(PgStore),
    My(MySqlStore),
}

/// A producer with its outbox: keep-order by default, stream `oc` publish-on-commit to Redis.
enum Armed {
    Sqlite(SqliteStore, Outbox<SqliteStore>),
    Pg(PgStore, Outbox<PgStore>),
    My(MySqlStore, Outbox<MySqlStore>),
}

impl Producer {
    fn arm(self, publisher: RedisPublisher) -> Armed {
        fn outbox<S: Store + Clone + 'static>(store: &S, p: RedisPublisher) -> Outbox<S> {
            Outbox::builder(store.clone(), p)
                .strategy(KeepOrder::default())
                .stream_strategy("oc", PublishOnCommit)
                .build()
                .unwrap()
        }
        match self {
            Self::Sqlite(s) => {
                let o = outbox(&s, publisher);
                Armed::Sqlite(s, o)
            }
            Self::Pg(s) => {
                let o = outbox(&s, publisher);
                Armed::Pg(s, o)
            }
            Self::My(s) => {
                let o = outbox(&s, publisher);
                Armed::My(s, o)
            }
        }
    }
}

impl Armed {
    fn store(&self) -> std::sync::Arc<dyn StoreAdmin> {
        match self {
            Self::Sqlite(s, _) => std::sync::Arc::new(s.clone()),
            Self::Pg(s, _) => std::sync::Arc::new(s.clone()),
            Self::My(s, _) => std::sync::Arc::new(s.clone()),
        }
    }

    /// Commit `msgs` in one transaction, then dispatch the publish-on-commit ones.
    async fn commit(&self, msgs: Vec<Message>) {
        match self {
            Self::Sqlite(s, o) => {
                let mut conn = s.connect().unwrap();
                let mut tx = conn.transaction().unwrap();
                let after = o.enqueue_blocking(&mut tx, msgs).unwrap();
                tx.commit().unwrap();
                after.dispatch();
            }
            Self::Pg(s, o) => {
                let mut tx = s.pool().begin().await.unwrap();
                let after = o.enqueue(&mut tx, msgs).await.unwrap();
                tx.commit().await.unwrap();
                after.dispatch();
            }
            Self::My(s, o) => {
                let mut tx = s.pool().begin().await.unwrap();
                let after = o.enqueue(&mut tx, msgs).await.unwrap();
                tx.commit().await.unwrap();
                after.dispatch();
            }
        }
    }

    async fn shutdown(&self) {
        let r = match self {
            Self::Sqlite(_, o) => o.shutdown(Duration::from_secs(60)).await,
            Self::Pg(_, o) => o.shutdown(Duration::from_secs(60)).await,
            Self::My(_, o) => o.shutdown(Duration::from_secs(60)).await,
        };
        r.unwrap();
    }
}

/// Relay processes, killed when the test ends (also when it fails).
struct Relays(Vec<Child>);

impl Drop for Relays {
    fn drop(&mut self) {
        for r in &mut self.0 {
            let _ = r.kill();
            let _ = r.wait();
        }
    }
}

fn spawn_relay(store_url: &str, table: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args([
            "--store",
            store_url,
            "--table",
            table,
            "relay",
            "--loop",
            "--publisher",
            &redis_url(),
        ])
        .args([
            "--interval",
            "50ms",
            "--batch",
            &BATCH.to_string(),
            "--lease",
            "2s",
            "--publish-timeout",
            "1s",
        ])
        .args([
            "--max-attempts",
            "100000",
            "--retry-initial",
            "100ms",
            "--retry-max",
            "1s",
        ])
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

async fn sigkill_relays_while_committing(
    name: &str,
    store_url: &str,
    table: &str,
    producer: Producer,
) {
    let migrate = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args(["--store", store_url, "--table", table, "migrate"])
        .output()
        .unwrap();
    assert!(
        migrate.status.success(),
        "{}",
        String::from_utf8_lossy(&migrate.stderr)
    );
    let stream_key = format!("kill-{}", uuid::Uuid::now_v7().simple());
    let (oc_key, poison_key) = (format!("{stream_key}-oc"), format!("{stream_key}-poison"));
    let (kills_target, relay_count) = (
        env_usize("OUTBOX_SOAK_KILLS", 8),
        env_usize("OUTBOX_SOAK_RELAYS", 2),
    );
    let mut conn = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // Key k5 goes to a Redis key of the wrong type: every XADD fails (WRONGTYPE), its unit
    // is stuck and retried, until the key is healed part-way through.
    let _: () = conn.set(&poison_key, "not a stream").await.unwrap();
    let producer = producer.arm(
        RedisPublisher::connect(&redis_url())
            .await
            .unwrap()
            .streams(None),
    );

    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let (min_txs, per_tx, backlog_txs) = (500usize, 16usize, 150usize);
    let mut kills = 0usize;
    let mut healed = false;
    let mut relays = Relays(Vec::new());
    let mut next_kill = Instant::now();
    let (mut keep_order, mut on_commit) = (0usize, 0usize);
    let started = Instant::now();
    let mut t = 0usize;
    while t < min_txs || kills < kills_target {
        if t == backlog_txs {
            // Relays start on a backlog, so they are busy (mid-batch) when killed.
            relays.0 = (0..relay_count)
                .map(|_| spawn_relay(store_url, table))
                .collect();
            next_kill = Instant::now() + Duration::from_millis(rng.gen_range(300..700));
        }
        let mut msgs: Vec<Message> = (0..per_tx)
            .map(|j| {
                let i = keep_order + j;
                let key = format!("k{}", i % 6);
                let dest = if key == "k5" {
                    &poison_key
                } else {
                    &stream_key
                };
                Message::new(dest.clone(), i.to_string().into_bytes()).key(key)
            })
            .collect();
        keep_order += per_tx;
        if t.is_multiple_of(4) {
            msgs.push(
                Message::new(oc_key.clone(), on_commit.to_string().into_bytes()).stream("oc"),
            );
            on_commit += 1;
        }
        producer.commit(msgs).await;
        if !relays.0.is_empty() && Instant::now() >= next_kill {
            let victim = rng.gen_range(0..relay_count);
            relays.0[victim].kill().unwrap(); // SIGKILL
            relays.0[victim].wait().unwrap();
            relays.0[victim] = spawn_relay(store_url, table);
            kills += 1;
            next_kill = Instant::now() + Duration::from_millis(rng.gen_range(300..700));
        }
        if !healed && kills * 10 >= kills_target * 6 {
            let _: () = conn.del(&poison_key).await.unwrap();
            healed = true;
        }
        if !relays.0.is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        t += 1;
    }
    if !healed {
        let _: () = conn.del(&poison_key).await.unwrap();
    }
    producer.shutdown().await;
    let store = producer.store();
    eventually(
        "every committed message published",
        Duration::from_secs(180),
        || async { store.stats().await.unwrap().total().pending == 0 },
    )
    .await;
    drop(relays);

    let mut d = outbox_core::conformance::Deliveries::default();
    let mut entries = 0;
    for key in [&stream_key, &poison_key] {
        let reply: redis::streams::StreamRangeReply = conn.xrange_all(key).await.unwrap();
        let _: () = conn.del(key).await.unwrap();
        entries += reply.ids.len();
        for e in &reply.ids {
            let i: usize = e.get::<String>("payload").unwrap().parse().unwrap();
            d.record(
                e.get::<String>("id").unwrap(),
                e.get::<String>("key").unwrap(),
                i,
            );
        }
    }
    let reply: redis::streams::StreamRangeReply = conn.xrange_all(&oc_key).await.unwrap();
    let _: () = conn.del(&oc_key).await.unwrap();
    let oc_ids: std::collections::HashSet<String> = reply
        .ids
        .iter()
        .map(|e| e.get::<String>("id").unwrap())
        .collect();
    let (duplicates, violations) = (d.duplicates(), d.order_violations());
    let lost = (keep_order - d.distinct()) + (on_commit - oc_ids.len());
    println!(
        "[{name}] SIGKILL soak: {} committed ({keep_order} keep-order, {on_commit} publish-on-commit), {} published entries, {kills} kills of {relay_count} relays in {:.0?}, {duplicates} duplicates ({:.1} per kill), {violations} order violations, {lost} lost",
        keep_order + on_commit,
        entries + reply.ids.len(),
        started.elapsed(),
        duplicates as f64 / kills.max(1) as f64,
    );
    assert!(
        kills >= kills_target.min(5),
        "the test killed too rarely ({kills})"
    );
    assert_eq!(
        d.distinct(),
        keep_order,
        "every keep-order message published at least once"
    );
    assert_eq!(
        oc_ids.len(),
        on_commit,
        "every publish-on-commit message published"
    );
    assert!(
        duplicates <= kills * BATCH,
        "{duplicates} duplicates for {kills} kills of batches of {BATCH}"
    );
    assert_eq!(violations, 0, "keep-order keys out of order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_relays_killed_mid_batch_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kill.db");
    let store = SqliteStore::open(&path).unwrap();
    let url = format!("sqlite://{}", path.display());
    sigkill_relays_while_committing("sqlite", &url, "outbox", Producer::Sqlite(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_relays_killed_mid_batch_lose_nothing() {
    let url = std::env::var("OUTBOX_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let table = format!("outbox_kill{}", uuid::Uuid::now_v7().simple());
    let store = PgStore::connect_with(
        &url,
        PgOptions {
            table: table.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    sigkill_relays_while_committing("postgres", &url, &table, Producer::Pg(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_relays_killed_mid_batch_lose_nothing() {
    let url = std::env::var("OUTBOX_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into());
    let table = format!(
        "outbox_kill{}",
        &uuid::Uuid::now_v7().simple().to_string()[..20]
    );
    let store = MySqlStore::connect_with(
        &url,
        MySqlOptions {
            table: table.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    sigkill_relays_while_committing("mariadb", &url, &table, Producer::My(store)).await;
}
