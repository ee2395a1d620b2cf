//! Many databases in one relay process (issue #35): 100 stores drained by one `Fleet`
//! against 100 single-store relays (throughput, peak memory, open files), and fairness: how
//! long ten small stores take to deliver next to one store with a large backlog, against
//! alone.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox::postgres::{PgOptions, PgStore};
use outbox::sqlite::SqliteStore;
use outbox::{
    async_trait, Envelope, Fleet, KeepOrder, Message, Outbox, Publisher, Relay, RelayConfig, Store,
};

use super::{rate, Res};

/// Counts publishes per destination (the store's name).
#[derive(Clone, Default)]
struct Counter(Arc<Mutex<HashMap<String, usize>>>);

#[async_trait]
impl Publisher for Counter {
    async fn publish(&self, e: &Envelope) -> outbox::Result<()> {
        *self
            .0
            .lock()
            .unwrap()
            .entry(e.message.destination.clone())
            .or_default() += 1;
        Ok(())
    }

    fn ordered_batches(&self) -> bool {
        true
    }

    async fn publish_batch(&self, batch: &[&Envelope]) -> Vec<outbox::Result<()>> {
        let mut m = self.0.lock().unwrap();
        for e in batch {
            *m.entry(e.message.destination.clone()).or_default() += 1;
        }
        batch.iter().map(|_| Ok(())).collect()
    }
}

impl Counter {
    fn of(&self, name: &str) -> usize {
        self.0.lock().unwrap().get(name).copied().unwrap_or(0)
    }

    fn total(&self) -> usize {
        self.0.lock().unwrap().values().sum()
    }
}

/// A SQLite store at `dir/name.db` holding `rows` keep-order messages on 10 keys, all to
/// destination `name`.
fn fill(dir: &Path, name: &str, rows: usize) -> Res<SqliteStore> {
    let store = SqliteStore::open(dir.join(format!("{name}.db")))?;
    store.migrate_now()?;
    let outbox = Outbox::writer(store.clone())
        .strategy(KeepOrder::default())
        .build()?;
    let mut conn = store.connect()?;
    for chunk in (0..rows).collect::<Vec<_>>().chunks(10_000) {
        let mut tx = conn.transaction()?;
        let msgs = chunk
            .iter()
            .map(|i| Message::new(name.to_owned(), b"{}".to_vec()).key(format!("k{}", i % 10)));
        let _ = outbox.enqueue_blocking(&mut tx, msgs)?;
        tx.commit()?;
    }
    Ok(store)
}

fn config() -> RelayConfig {
    RelayConfig {
        batch_size: 500,
        poll_interval: Duration::from_millis(50),
        ..Default::default()
    }
}

/// Drain `total` messages of `stores` with one `Fleet` (`fleet` true, 8 batches at once)
/// or a relay per store; returns the open files while draining.
async fn drain(
    stores: Vec<(String, Arc<dyn Store>)>,
    fleet: bool,
    counter: &Counter,
    total: usize,
) -> Res<usize> {
    let done = || async {
        while counter.total() < total {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        open_files()
    };
    if fleet {
        let fleet = Fleet::builder(counter.clone())
            .config(config())
            .max_batches(8)
            .build()?;
        for (name, s) in stores {
            fleet.add(&name, s)?;
        }
        let fds = done().await;
        fleet.shutdown().await;
        return Ok(fds);
    }
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let tasks: Vec<_> = stores
        .into_iter()
        .map(|(_, s)| {
            let relay = Relay::builder(s, counter.clone())
                .config(config())
                .build()
                .unwrap();
            let mut stopped = stopped.clone();
            tokio::spawn(async move {
                relay
                    .run(async move {
                        let _ = stopped.wait_for(|s| *s).await;
                    })
                    .await
            })
        })
        .collect();
    let fds = done().await;
    let _ = stop.send(true);
    for t in tasks {
        let _ = t.await;
    }
    Ok(fds)
}

/// The child process of one drain: `mode` is `fleet` or `relays`, over `stores` SQLite
/// files in `dir` holding `rows` each. Prints `msg/s peak-RSS-KiB open-files`.
pub(super) async fn child(mode: &str, dir: &str, stores: usize, rows: usize) -> Res {
    let dir = Path::new(dir);
    let counter = Counter::default();
    let opened: Vec<(String, Arc<dyn Store>)> = (0..stores)
        .map(|i| {
            let name = format!("s{i}");
            let store = SqliteStore::open(dir.join(format!("{name}.db")))?;
            Ok((name, Arc::new(store) as Arc<dyn Store>))
        })
        .collect::<Res<_>>()?;
    let total = stores * rows;
    let started = Instant::now();
    let fds = drain(opened, mode == "fleet", &counter, total).await?;
    let took = started.elapsed();
    let status = std::fs::read_to_string("/proc/self/status")?;
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("0")
        .to_owned();
    println!("{:.0} {hwm} {fds}", rate(total, took));
    Ok(())
}

/// The child process of one PostgreSQL drain: `mode` is `relays` (a relay per store, the
/// store's defaults: a pool of 5 and a LISTEN connection), `fleet` (pools of 2, as
/// `relay --stores` opens them) or `fleet-poll` (pools of 2, no LISTEN), over `stores` tables
/// `<prefix>0..` holding `rows` each. Prints `msg/s`.
pub(super) async fn pg_child(mode: &str, prefix: &str, stores: usize, rows: usize) -> Res {
    let counter = Counter::default();
    let mut opened = Vec::new();
    for i in 0..stores {
        let options = match mode {
            "relays" => PgOptions::default(),
            _ => PgOptions {
                max_connections: 2,
                listen: mode == "fleet",
                ..Default::default()
            },
        };
        let store = PgStore::connect_with(
            &super::pg_url(),
            PgOptions {
                table: format!("{prefix}{i}"),
                ..options
            },
        )
        .await?;
        opened.push((format!("{prefix}{i}"), Arc::new(store) as Arc<dyn Store>));
    }
    let total = stores * rows;
    let started = Instant::now();
    drain(opened, mode != "relays", &counter, total).await?;
    println!("{:.0}", rate(total, started.elapsed()));
    Ok(())
}

/// PostgreSQL stores (tables of one database, so one server's connections are counted):
/// drained by a relay per store and by a fleet, with and without LISTEN; the connections the
/// child held at most, sampled from `pg_stat_activity`.
async fn pg_connections(stores: usize, rows: usize) -> Res {
    let prefix = format!("fleetpg{}_", &super::uuid_like()[..8]);
    let admin = PgStore::connect(&super::pg_url()).await?;
    let pool = admin.pool().clone();
    let max: String = outbox::postgres::sqlx::query_scalar("SHOW max_connections")
        .fetch_one(&pool)
        .await?;
    println!(
        "\n{stores} PostgreSQL stores (tables of one database; the server allows {max} connections) x {rows} keep-order rows; connections of the relay process at most, sampled every 20 ms from `pg_stat_activity`.\n"
    );
    println!("| mode | msg/s | connections at most |\n|---|---|---|");
    for mode in ["relays", "fleet", "fleet-poll"] {
        for i in 0..stores {
            let store = PgStore::connect_with(
                &super::pg_url(),
                PgOptions {
                    table: format!("{prefix}{i}"),
                    max_connections: 1,
                    ..Default::default()
                },
            )
            .await?;
            store.migrate().await?;
            let outbox = Outbox::writer(store.clone())
                .strategy(KeepOrder::default())
                .build()?;
            let mut tx = store.pool().begin().await?;
            let msgs = (0..rows).map(|j| {
                Message::new(format!("{prefix}{i}"), b"{}".to_vec()).key(format!("k{}", j % 10))
            });
            drop(outbox.enqueue(&mut tx, msgs).await?);
            tx.commit().await?;
        }
        let count = || async {
            outbox::postgres::sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'",
            )
            .fetch_one(&pool)
            .await
            .unwrap_or(0)
        };
        let before = count().await;
        // The child prints one short line at its end: the pipe cannot fill while it runs.
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .args(["--fleet-pg-child", mode, &prefix])
            .args([stores.to_string(), rows.to_string()])
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let mut most = 0;
        let out = loop {
            most = most.max(count().await - before);
            if child.try_wait()?.is_some() {
                break child.wait_with_output()?;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let label = match mode {
            "relays" => "a relay per store (pool of 5, LISTEN)",
            "fleet" => "one Fleet (pools of 2, LISTEN)",
            _ => "one Fleet, polling (pools of 2, listen = false)",
        };
        println!(
            "| {label} | {} | {most} ({:.1} per store) |",
            String::from_utf8_lossy(&out.stdout).trim(),
            most as f64 / stores as f64
        );
        for i in 0..stores {
            let t = format!("{prefix}{i}");
            let sql = format!("DROP TABLE IF EXISTS {t}, {t}_units, {t}_due, {t}_schema");
            let _ = outbox::postgres::sqlx::query(&sql).execute(&pool).await;
        }
    }
    Ok(())
}

fn open_files() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

pub(super) async fn section(quick: bool) -> Res {
    println!("\n## Many databases in one relay process (#35): `--only fleet`\n");
    let stores = 100;
    let rows = if quick { 200 } else { 1_000 };
    println!(
        "{stores} SQLite stores x {rows} keep-order rows on 10 keys each; a counting publisher that keeps batch order; batch 500. Each mode runs in a child process of its own (peak RSS, open files while draining)."
    );
    println!("\n| mode | msg/s | peak RSS | open files |\n|---|---|---|---|");
    for mode in ["relays", "fleet"] {
        let dir = tempfile::tempdir()?;
        for i in 0..stores {
            fill(dir.path(), &format!("s{i}"), rows)?;
        }
        let out = std::process::Command::new(std::env::current_exe()?)
            .args(["--fleet-child", mode])
            .arg(dir.path())
            .args([stores.to_string(), rows.to_string()])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let f: Vec<&str> = text.split_whitespace().collect();
        let label = if mode == "fleet" {
            "one Fleet, 8 batches at once"
        } else {
            "100 relays, one per store"
        };
        println!(
            "| {label} | {} | {} MiB | {} |",
            f.first().unwrap_or(&"?"),
            f.get(1)
                .and_then(|k| k.parse::<u64>().ok())
                .map_or("?".into(), |k| (k / 1024).to_string()),
            f.get(2).unwrap_or(&"?")
        );
    }

    pg_connections(if quick { 20 } else { 30 }, rows).await?;

    // Fairness: ten stores of 10 rows, alone and next to one with a large backlog.
    let big_rows = if quick { 100_000 } else { 1_000_000 };
    let dir = tempfile::tempdir()?;
    let big = fill(dir.path(), "big", big_rows)?;
    let mut took = Vec::new();
    for with_big in [false, true] {
        let counter = Counter::default();
        let fleet = Fleet::builder(counter.clone())
            .config(config())
            .max_batches(8)
            .build()?;
        if with_big {
            fleet.add("big", Arc::new(big.clone()))?;
            // Let the big store get going first.
            while counter.of("big") == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let small: Vec<(String, SqliteStore)> = (0..10)
            .map(|i| {
                let name = format!("small{i}-{with_big}");
                let store = fill(dir.path(), &name, 10)?;
                Ok((name, store))
            })
            .collect::<Res<_>>()?;
        let started = Instant::now();
        for (name, store) in small {
            fleet.add(&name, Arc::new(store))?;
        }
        while (0..10).any(|i| counter.of(&format!("small{i}-{with_big}")) < 10) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        took.push(started.elapsed());
        fleet.shutdown().await;
    }
    println!(
        "\nFairness: ten stores of 10 rows delivered in {:.1} ms alone, {:.1} ms next to a store draining a {big_rows}-row backlog ({:.2}x).",
        took[0].as_secs_f64() * 1e3,
        took[1].as_secs_f64() * 1e3,
        took[1].as_secs_f64() / took[0].as_secs_f64()
    );
    Ok(())
}
