//! Relay processes killed with SIGKILL at random moments while producers keep committing, on
//! SQLite, PostgreSQL and MariaDB, publishing to the real Redis: every committed message is
//! published at least once, duplicates stay within one batch per kill, and keep-order keys
//! keep their order.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outbox_core::conformance::eventually;
use outbox_core::{Message, Outbox, Store, Strategy};
use outbox_redis::redis::{self, AsyncCommands};
use outbox_sql::mysql::{MySqlOptions, MySqlStore};
use outbox_sql::postgres::{PgOptions, PgStore};
use outbox_sqlite::SqliteStore;
use rand::{Rng, SeedableRng};

const BATCH: usize = 20;
const RELAYS: usize = 2;

fn redis_url() -> String {
    std::env::var("OUTBOX_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into())
}

enum Producer {
    Sqlite(SqliteStore),
    Pg(PgStore),
    My(MySqlStore),
}

impl Producer {
    fn store(&self) -> std::sync::Arc<dyn Store> {
        match self {
            Self::Sqlite(s) => std::sync::Arc::new(s.clone()),
            Self::Pg(s) => std::sync::Arc::new(s.clone()),
            Self::My(s) => std::sync::Arc::new(s.clone()),
        }
    }

    /// Commit `msgs` through a writer-only keep-order outbox (no publisher: the relays
    /// under test publish).
    async fn commit(&self, msgs: Vec<Message>) {
        fn writer<S: Store + Clone + 'static>(store: &S) -> Outbox<S> {
            Outbox::writer(store.clone())
                .strategy(Strategy::KeepOrder)
                .build()
                .unwrap()
        }
        match self {
            Self::Sqlite(s) => {
                let outbox = writer(s);
                let mut conn = s.connect().unwrap();
                let mut tx = conn.transaction().unwrap();
                drop(outbox.enqueue_blocking(&mut tx, msgs).unwrap());
                tx.commit().unwrap();
            }
            Self::Pg(s) => {
                let outbox = writer(s);
                let mut tx = s.pool().begin().await.unwrap();
                drop(outbox.enqueue(&mut tx, msgs).await.unwrap());
                tx.commit().await.unwrap();
            }
            Self::My(s) => {
                let outbox = writer(s);
                let mut tx = s.pool().begin().await.unwrap();
                drop(outbox.enqueue(&mut tx, msgs).await.unwrap());
                tx.commit().await.unwrap();
            }
        }
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
        .args(["--max-attempts", "100000"])
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

    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let (txs, per_tx, backlog_txs) = (500usize, 16usize, 150usize);
    let mut kills = 0usize;
    let mut relays = Relays(Vec::new());
    let mut next_kill = Instant::now();
    for t in 0..txs {
        if t == backlog_txs {
            // Relays start on a backlog, so they are busy (mid-batch) when killed.
            relays.0 = (0..RELAYS).map(|_| spawn_relay(store_url, table)).collect();
            next_kill = Instant::now() + Duration::from_millis(rng.gen_range(300..700));
        }
        let msgs = (0..per_tx)
            .map(|j| {
                let i = t * per_tx + j;
                Message::new(stream_key.clone(), i.to_string().into_bytes())
                    .key(format!("k{}", i % 6))
            })
            .collect();
        producer.commit(msgs).await;
        if !relays.0.is_empty() && Instant::now() >= next_kill {
            let victim = rng.gen_range(0..RELAYS);
            relays.0[victim].kill().unwrap(); // SIGKILL
            relays.0[victim].wait().unwrap();
            relays.0[victim] = spawn_relay(store_url, table);
            kills += 1;
            next_kill = Instant::now() + Duration::from_millis(rng.gen_range(300..700));
        }
        if !relays.0.is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let store = producer.store();
    eventually(
        "every committed message published",
        Duration::from_secs(120),
        || async { store.stats().await.unwrap().total().pending == 0 },
    )
    .await;
    drop(relays);

    let mut conn = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let reply: redis::streams::StreamRangeReply = conn.xrange_all(&stream_key).await.unwrap();
    let _: () = conn.del(&stream_key).await.unwrap();
    let mut d = outbox_core::conformance::Deliveries::default();
    for e in &reply.ids {
        let i: usize = e.get::<String>("payload").unwrap().parse().unwrap();
        d.record(
            e.get::<String>("id").unwrap(),
            e.get::<String>("key").unwrap(),
            i,
        );
    }
    let n = txs * per_tx;
    let (duplicates, violations) = (d.duplicates(), d.order_violations());
    println!(
        "[{name}] SIGKILL test: {n} committed, {} published entries, {kills} kills, {duplicates} duplicates, {violations} order violations",
        reply.ids.len()
    );
    assert!(kills >= 5, "the test killed too rarely ({kills})");
    assert_eq!(
        d.distinct(),
        n,
        "every committed message published at least once"
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
