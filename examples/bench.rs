//! Benchmarks: relay throughput against raw baselines measured in the same run, commit-to-
//! publish latency, the business transaction's write overhead, relay memory on a large
//! backlog, and idle query rate. Prints a report; see BENCHMARKS.md for recorded figures.
//!
//! Run (services from scripts/setup.sh):
//!   cargo run --release --example bench --features all-backends
//! Options: --rows N (backlog per throughput run, default 100000), --rss-rows N (default
//! 1000000), --quick (smaller backlogs, for a fast look), --only a,b (sections: throughput, wal (or wal-writer, wal-latency, wal-drain),
//! latency, overhead, memory, keep-order, one-unit, listing, inbox, relays, fleet); --inbox-messages N
//! (default 10000).

use outbox::StoreAdmin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use outbox::amqp::lapin;
use outbox::amqp::AmqpPublisher;
use outbox::mysql::{MySqlOptions, MySqlStore};
use outbox::postgres::{PgOptions, PgStore};
use outbox::redis::RedisPublisher;
use outbox::sqlite::{SqliteOptions, SqliteStore};
use outbox::{
    async_trait, Claim, Envelope, Exhausted, Failure, KeepOrder, Message, MessageId, NewMessage,
    NullPublisher, Order, Outbox, PublishedBy, Publisher, Relay, Selector, Stats, Status, Store,
    StoredMessage, StreamFilter,
};

type Res<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[path = "bench/wal.rs"]
mod wal;

#[path = "bench/fleet.rs"]
mod fleet;

const BATCH: usize = 500;

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_owned())
}

fn pg_url() -> String {
    env_or("OUTBOX_PG_URL", "postgres://postgres@127.0.0.1:5432/test")
}
fn mysql_url() -> String {
    env_or("OUTBOX_MYSQL_URL", "mysql://root@127.0.0.1:3306/test")
}
fn redis_url() -> String {
    env_or("OUTBOX_REDIS_URL", "redis://127.0.0.1:6379/")
}
fn amqp_url() -> String {
    env_or("OUTBOX_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
}

fn unique(prefix: &str) -> String {
    format!("{prefix}{}", &uuid_like()[..16])
}

fn uuid_like() -> String {
    MessageId::new().to_string().replace('-', "")
}

/// A store under test, plus how to drop its table afterwards.
struct Bench {
    name: &'static str,
    store: Arc<dyn StoreAdmin>,
    /// SQL run between measurements (VACUUM / ANALYZE), so each run starts from the same
    /// state: autovacuum after a 100k-row drain otherwise lands on whichever run comes next.
    maintain: Vec<String>,
    /// SQL that drops the benchmark's tables.
    cleanup: Vec<String>,
    pg: Option<PgStore>,
    my: Option<MySqlStore>,
}

impl Bench {
    async fn exec(&self, statements: &[String]) {
        for sql in statements {
            if let Some(pg) = &self.pg {
                let _ = outbox::postgres::sqlx::query(sql).execute(pg.pool()).await;
            }
            if let Some(my) = &self.my {
                let _ = outbox::mysql::sqlx::query(sql).execute(my.pool()).await;
            }
        }
    }

    async fn maintain(&self) {
        self.exec(&self.maintain).await;
    }

    async fn cleanup(&self) {
        self.exec(&self.cleanup).await;
    }
}

async fn stores(dir: &std::path::Path) -> Res<Vec<Bench>> {
    let mut out = Vec::new();
    for kind in ["sqlite", "postgres", "mariadb"] {
        out.push(bench_store(kind, dir).await?);
    }
    Ok(out)
}

/// A fresh table (a fresh file for SQLite) of one store kind.
async fn bench_store(kind: &'static str, dir: &std::path::Path) -> Res<Bench> {
    Ok(match kind {
        "sqlite" => {
            let sqlite = SqliteStore::open_with(
                dir.join(format!("{}.db", unique("bench"))),
                SqliteOptions {
                    table: "outbox".into(),
                    ..Default::default()
                },
            )?;
            sqlite.migrate_now()?;
            Bench {
                name: "sqlite",
                store: Arc::new(sqlite),
                maintain: vec![],
                cleanup: vec![],
                pg: None,
                my: None,
            }
        }
        "postgres" => {
            let t = unique("outbox_bench");
            let pg = PgStore::connect_with(
                &pg_url(),
                PgOptions {
                    table: t.clone(),
                    ..Default::default()
                },
            )
            .await?;
            pg.migrate().await?;
            Bench {
                name: "postgres",
                store: Arc::new(pg.clone()),
                maintain: vec![
                    format!("VACUUM ANALYZE {t}"),
                    format!("VACUUM ANALYZE {t}_due"),
                ],
                cleanup: vec![format!("DROP TABLE {t}, {t}_units, {t}_due, {t}_schema")],
                pg: Some(pg),
                my: None,
            }
        }
        _ => {
            let t = unique("outbox_bench");
            let my = MySqlStore::connect_with(
                &mysql_url(),
                MySqlOptions {
                    table: t.clone(),
                    ..Default::default()
                },
            )
            .await?;
            my.migrate().await?;
            Bench {
                name: "mariadb",
                store: Arc::new(my.clone()),
                maintain: vec![format!("ANALYZE TABLE {t}, {t}_due")],
                cleanup: vec![format!("DROP TABLE {t}, {t}_locks, {t}_due, {t}_schema")],
                pg: None,
                my: Some(my),
            }
        }
    })
}

fn row(destination: &str, i: usize) -> NewMessage {
    NewMessage {
        envelope: Envelope {
            id: MessageId::new(),
            created_at: SystemTime::now(),
            message: Message::new(
                destination,
                format!("{{\"n\":{i},\"pad\":\"0123456789abcdef0123456789abcdef\"}}").into_bytes(),
            )
            .content_type("application/json"),
        },
        order: Order::Unordered,
        unit: String::new(),
        exhausted: Exhausted::Default,
        published_by: PublishedBy::Relay,
        signature: None,
        status: Status::Pending,
        attempts: 0,
        retry_after: Duration::ZERO,
        not_before: None,
        last_error: None,
        lease: None,
    }
}

async fn fill(store: &dyn Store, n: usize, destination: &str) -> Res {
    let mut i = 0;
    while i < n {
        let chunk: Vec<NewMessage> = (i..(i + 2000).min(n))
            .map(|j| row(destination, j))
            .collect();
        i += chunk.len();
        store.insert(&chunk).await?;
    }
    Ok(())
}

/// Raw baseline: the same claim + delete statements, nothing published, with `concurrency`
/// loops at once (as a relay with that many batches in flight).
async fn claim_delete(store: &dyn Store, concurrency: usize) -> Res<usize> {
    let loops = (0..concurrency).map(|i| async move {
        let claim = Claim::new(
            format!("baseline-{i}"),
            StreamFilter::All,
            BATCH,
            Duration::from_secs(60),
        );
        let mut n = 0;
        loop {
            let rows = store.claim(&claim).await?;
            if rows.is_empty() {
                return Res::<usize>::Ok(n);
            }
            n += rows.len();
            let seqs: Vec<i64> = rows
                .iter()
                .map(|r| match r {
                    Ok(m) => m.seq,
                    Err(q) => q.seq,
                })
                .collect();
            store.complete(&seqs, true).await?;
        }
    });
    let mut n = 0;
    for r in futures_util::future::join_all(loops).await {
        n += r?;
    }
    Ok(n)
}

async fn relay_drain(
    store: Arc<dyn StoreAdmin>,
    publisher: Arc<dyn Publisher>,
    concurrency: usize,
) -> Res<usize> {
    let relay = Relay::builder(store, publisher)
        .batch_size(BATCH)
        .delete_after_send(true)
        .concurrency(concurrency)
        .build()?;
    let r = relay.run_once().await?;
    assert_eq!(r.failed, 0, "publish failures during the benchmark");
    Ok(r.published)
}

/// Raw baseline: the publisher alone, same batch size, same messages, `concurrency` batches
/// in flight at once (as a relay with that concurrency).
async fn publish_loop(
    publisher: &dyn Publisher,
    n: usize,
    destination: &str,
    concurrency: usize,
) -> Res<usize> {
    let rows: Vec<Envelope> = (0..n).map(|i| row(destination, i).envelope).collect();
    let chunks: Vec<&[Envelope]> = rows.chunks(BATCH).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let loops = (0..concurrency).map(|_| async {
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(chunk) = chunks.get(i) else {
                return Res::<()>::Ok(());
            };
            let refs: Vec<&Envelope> = chunk.iter().collect();
            for r in publisher.publish_batch(&refs).await {
                r?;
            }
        }
    });
    for r in futures_util::future::join_all(loops).await {
        r?;
    }
    Ok(n)
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

async fn timed<F: std::future::Future<Output = Res<usize>>>(f: F) -> Res<(usize, f64)> {
    let t = Instant::now();
    let n = f.await?;
    Ok((n, rate(n, t.elapsed())))
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "meets target"
    } else {
        "MISSES target"
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// Records commit-to-acknowledgement latency of every message it publishes.
struct Latency<P> {
    inner: P,
    samples: Arc<Mutex<Vec<Duration>>>,
}

#[async_trait]
impl<P: Publisher> Publisher for Latency<P> {
    async fn publish(&self, env: &Envelope) -> outbox::Result<()> {
        self.publish_batch(&[env]).await.pop().unwrap()
    }
    async fn publish_batch(&self, batch: &[&Envelope]) -> Vec<outbox::Result<()>> {
        let out = self.inner.publish_batch(batch).await;
        let mut s = self.samples.lock().unwrap();
        for (e, r) in batch.iter().zip(&out) {
            if r.is_ok() {
                s.push(e.created_at.elapsed().unwrap_or_default());
            }
        }
        out
    }
}

/// Counts the store calls an idle relay makes.
struct Counting<S> {
    inner: S,
    claims: AtomicU64,
}

#[async_trait]
impl<S: Store> Store for Counting<S> {
    async fn migrate(&self) -> outbox::Result<()> {
        self.inner.migrate().await
    }
    async fn insert(&self, rows: &[NewMessage]) -> outbox::Result<Vec<i64>> {
        self.inner.insert(rows).await
    }
    async fn claim(&self, claim: &Claim) -> outbox::Result<Vec<outbox::Claimed>> {
        self.claims.fetch_add(1, Ordering::Relaxed);
        self.inner.claim(claim).await
    }
    async fn complete(&self, seqs: &[i64], delete: bool) -> outbox::Result<()> {
        self.inner.complete(seqs, delete).await
    }
    async fn fail(&self, owner: &str, failures: &[Failure]) -> outbox::Result<()> {
        self.inner.fail(owner, failures).await
    }
    async fn wait_for_work(&self, timeout: Duration) {
        self.inner.wait_for_work(timeout).await
    }
    fn notify_committed(&self) {
        self.inner.notify_committed()
    }
    async fn park_unit(&self, stream: &str, unit: &str, reason: &str) -> outbox::Result<()> {
        self.inner.park_unit(stream, unit, reason).await
    }
}

#[async_trait]
impl<S: StoreAdmin> StoreAdmin for Counting<S> {
    async fn schema(&self) -> outbox::Result<outbox::SchemaReport> {
        self.inner.schema().await
    }

    async fn messages(&self, f: &outbox::MessageFilter) -> outbox::Result<Vec<StoredMessage>> {
        self.inner.messages(f).await
    }

    async fn parked_units(
        &self,
        stream: Option<&str>,
        limit: usize,
    ) -> outbox::Result<Vec<outbox::ParkedUnit>> {
        self.inner.parked_units(stream, limit).await
    }

    async fn resume_unit(&self, stream: &str, unit: &str) -> outbox::Result<()> {
        self.inner.resume_unit(stream, unit).await
    }

    async fn skip_head(&self, stream: &str, unit: &str) -> outbox::Result<Option<i64>> {
        self.inner.skip_head(stream, unit).await
    }

    async fn requeue(&self, s: &Selector) -> outbox::Result<u64> {
        self.inner.requeue(s).await
    }

    async fn purge_dead(&self, s: &Selector) -> outbox::Result<u64> {
        self.inner.purge_dead(s).await
    }

    async fn dead_letters(
        &self,
        stream: Option<&str>,
        limit: usize,
    ) -> outbox::Result<Vec<StoredMessage>> {
        self.inner.dead_letters(stream, limit).await
    }

    async fn clean(&self, before: SystemTime, limit: usize, dead: bool) -> outbox::Result<u64> {
        self.inner.clean(before, limit, dead).await
    }

    async fn stats(&self) -> outbox::Result<Stats> {
        self.inner.stats().await
    }

    async fn get(&self, seq: i64) -> outbox::Result<Option<StoredMessage>> {
        self.inner.get(seq).await
    }
}

async fn throughput(dir: &std::path::Path, rows: usize) -> Res {
    println!("\n## Relay throughput: drain a backlog of {rows} messages (batch {BATCH}, delete after send)\n");
    let redis = Arc::new(
        RedisPublisher::connect(&redis_url())
            .await?
            .streams(Some(100_000)),
    );
    let amqp = Arc::new(AmqpPublisher::connect(&amqp_url()).await?);
    let stream_key = unique("outbox-bench-");
    let queue = unique("outbox-bench-");
    let admin =
        lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default()).await?;
    let ch = admin.create_channel().await?;
    ch.queue_declare(
        queue.as_str().into(),
        Default::default(),
        Default::default(),
    )
    .await?;

    // Broker baselines, store-independent, at the relay's two concurrencies.
    let mut raw_pub: std::collections::HashMap<(&str, usize), f64> = Default::default();
    for c in [1, 2] {
        raw_pub.insert(
            ("null", c),
            timed(publish_loop(&NullPublisher, rows, "x", c)).await?.1,
        );
        raw_pub.insert(
            ("redis", c),
            timed(publish_loop(redis.as_ref(), rows, &stream_key, c))
                .await?
                .1,
        );
        raw_pub.insert(
            ("rabbitmq", c),
            timed(publish_loop(amqp.as_ref(), rows, &queue, c)).await?.1,
        );
        ch.queue_purge(queue.as_str().into(), Default::default())
            .await?;
    }
    println!("Each ratio compares like with like: the relay with c batches in flight against the raw loops with c loops at once.\n");
    println!("| store | publisher | c | raw claim+delete | raw publish | relay | relay / claim+delete | relay / publish | relay / min(raw) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for b in stores(dir).await? {
        // Raw baseline per concurrency, best of two passes (the first pass over freshly
        // written rows pays for stale planner statistics and hint-bit writes; the relay runs
        // after it would not).
        let mut cd: std::collections::HashMap<usize, f64> = Default::default();
        for c in [1, 2] {
            for _ in 0..2 {
                b.maintain().await;
                fill(b.store.as_ref(), rows, "x").await?;
                b.maintain().await;
                let r = timed(claim_delete(b.store.as_ref(), c)).await?.1;
                let e = cd.entry(c).or_insert(0.0);
                *e = e.max(r);
            }
        }
        let publishers: [(&str, Arc<dyn Publisher>, String); 3] = [
            ("null", Arc::new(NullPublisher), "x".into()),
            ("redis", redis.clone(), stream_key.clone()),
            ("rabbitmq", amqp.clone(), queue.clone()),
        ];
        for (pname, p, dest) in publishers {
            for c in [1, 2] {
                b.maintain().await;
                fill(b.store.as_ref(), rows, &dest).await?;
                b.maintain().await;
                let (n, r) = timed(relay_drain(b.store.clone(), p.clone(), c)).await?;
                assert_eq!(n, rows);
                let (cd, raw) = (cd[&c], raw_pub[&(pname, c)]);
                println!(
                    "| {} | {pname} | {c} | {cd:.0} msg/s | {raw:.0} msg/s | {r:.0} msg/s | {:.2} | {:.2} | {:.2} |",
                    b.name,
                    r / cd,
                    r / raw,
                    r / cd.min(raw)
                );
                if pname == "rabbitmq" {
                    ch.queue_purge(queue.as_str().into(), Default::default())
                        .await?;
                }
            }
        }
        b.cleanup().await;
    }
    ch.queue_delete(queue.as_str().into(), Default::default())
        .await?;
    let mut conn = outbox::redis::redis::Client::open(redis_url())?
        .get_multiplexed_async_connection()
        .await?;
    let _: () = outbox::redis::redis::AsyncCommands::del(&mut conn, &stream_key).await?;
    println!("\nTargets: relay >= 0.85 x raw claim+delete (null publisher) and >= 0.70 x raw broker loop; PostgreSQL -> Redis >= 30k msg/s.");
    Ok(())
}

/// Offer `rate` single-message transactions per second for `secs`, return sorted latencies.
async fn offered_load<F, Fut>(
    rate: u32,
    secs: u64,
    samples: Arc<Mutex<Vec<Duration>>>,
    mut commit: F,
) -> Res<Vec<Duration>>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Res>,
{
    let total = (rate as u64 * secs) as usize;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for i in 0..total {
        tick.tick().await;
        commit(i).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while samples.lock().unwrap().len() < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut s = samples.lock().unwrap().clone();
    s.sort();
    Ok(s)
}

async fn latency() -> Res {
    let (rate, secs) = (200u32, 5u64);
    println!("\n## Commit-to-publish latency at {rate} msg/s for {secs} s (one message per transaction, Redis)\n");
    println!("| path | p50 | p99 | max | delivered |");
    println!("|---|---|---|---|---|");
    let key = unique("outbox-lat-");
    let redis = RedisPublisher::connect(&redis_url())
        .await?
        .streams(Some(10_000));

    // Publish-on-commit (PostgreSQL).
    let table = unique("outbox_lat");
    let pg = PgStore::connect_with(
        &pg_url(),
        PgOptions {
            table: table.clone(),
            ..Default::default()
        },
    )
    .await?;
    pg.migrate().await?;
    let samples = Arc::new(Mutex::new(Vec::new()));
    let outbox = Outbox::builder(
        pg.clone(),
        Latency {
            inner: redis.clone(),
            samples: samples.clone(),
        },
    )
    .build()?;
    let s = offered_load(rate, secs, samples.clone(), |i| {
        let (pg, outbox, key) = (pg.clone(), outbox.clone(), key.clone());
        async move {
            let mut tx = pg.pool().begin().await?;
            let p = outbox
                .enqueue(&mut tx, [Message::new(key, i.to_string().into_bytes())])
                .await?;
            outbox::postgres::commit(tx, p).await?;
            Ok(())
        }
    })
    .await?;
    print_latency(
        "publish-on-commit (PostgreSQL)",
        &s,
        rate as usize * secs as usize,
    );

    // Keep-order, relay in another "process" woken by NOTIFY (60 s poll interval).
    let samples = Arc::new(Mutex::new(Vec::new()));
    let outbox = Outbox::builder(pg.clone(), NullPublisher)
        .strategy(KeepOrder::default())
        .build()?;
    let relay_store = pg.reopen().await?;
    let relay = Relay::builder(
        relay_store,
        Latency {
            inner: redis.clone(),
            samples: samples.clone(),
        },
    )
    .poll_interval(Duration::from_secs(60))
    .build()?;
    let (stop, mut stop_rx) = tokio::sync::watch::channel(false);
    let h = tokio::spawn(async move {
        relay
            .run(async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = offered_load(rate, secs, samples.clone(), |i| {
        let (pg, outbox, key) = (pg.clone(), outbox.clone(), key.clone());
        async move {
            let mut tx = pg.pool().begin().await?;
            drop(
                outbox
                    .enqueue(
                        &mut tx,
                        [Message::new(key, i.to_string().into_bytes()).key("k")],
                    )
                    .await?,
            );
            tx.commit().await?;
            Ok(())
        }
    })
    .await?;
    stop.send(true)?;
    h.await?;
    print_latency(
        "keep-order, NOTIFY wake-up (PostgreSQL)",
        &s,
        rate as usize * secs as usize,
    );
    let _ = outbox::postgres::sqlx::query(&format!("DROP TABLE {table}"))
        .execute(pg.pool())
        .await;

    // Keep-order, polling every 100 ms (MariaDB has no NOTIFY).
    let table = unique("outbox_lat");
    let my = MySqlStore::connect_with(
        &mysql_url(),
        MySqlOptions {
            table: table.clone(),
            ..Default::default()
        },
    )
    .await?;
    my.migrate().await?;
    let samples = Arc::new(Mutex::new(Vec::new()));
    let outbox = Outbox::builder(my.clone(), NullPublisher)
        .strategy(KeepOrder::default())
        .build()?;
    let relay = Relay::builder(
        my.reopen().await?,
        Latency {
            inner: redis.clone(),
            samples: samples.clone(),
        },
    )
    .poll_interval(Duration::from_millis(100))
    .build()?;
    let (stop, mut stop_rx) = tokio::sync::watch::channel(false);
    let h = tokio::spawn(async move {
        relay
            .run(async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            })
            .await
    });
    let s = offered_load(rate, secs, samples.clone(), |i| {
        let (my, outbox, key) = (my.clone(), outbox.clone(), key.clone());
        async move {
            let mut tx = my.pool().begin().await?;
            drop(
                outbox
                    .enqueue(
                        &mut tx,
                        [Message::new(key, i.to_string().into_bytes()).key("k")],
                    )
                    .await?,
            );
            tx.commit().await?;
            Ok(())
        }
    })
    .await?;
    stop.send(true)?;
    h.await?;
    print_latency(
        "keep-order, polling 100 ms (MariaDB)",
        &s,
        rate as usize * secs as usize,
    );
    let _ = outbox::mysql::sqlx::query(&format!("DROP TABLE {table}, {table}_locks"))
        .execute(my.pool())
        .await;
    let mut conn = outbox::redis::redis::Client::open(redis_url())?
        .get_multiplexed_async_connection()
        .await?;
    let _: () = outbox::redis::redis::AsyncCommands::del(&mut conn, &key).await?;
    println!("\nTargets: NOTIFY p50 <= 2 ms, p99 <= 10 ms.");
    Ok(())
}

/// Records, per message, publish time minus the moment just before its transaction's COMMIT
/// (`marks[i]`, message `i`'s payload is `i`). Keeps batch order, as an in-process publisher.
#[derive(Clone)]
struct Stamp {
    marks: Arc<Vec<Mutex<Option<Instant>>>>,
    samples: Arc<Mutex<Vec<Duration>>>,
}

#[async_trait]
impl Publisher for Stamp {
    async fn publish(&self, env: &Envelope) -> outbox::Result<()> {
        self.publish_batch(&[env]).await.pop().unwrap()
    }
    async fn publish_batch(&self, batch: &[&Envelope]) -> Vec<outbox::Result<()>> {
        let now = Instant::now();
        let mut s = self.samples.lock().unwrap();
        for e in batch {
            let i: usize = std::str::from_utf8(&e.message.payload)
                .ok()
                .and_then(|p| p.parse().ok())
                .unwrap_or(usize::MAX);
            if let Some(Some(t)) = self.marks.get(i).map(|m| *m.lock().unwrap()) {
                s.push(now.saturating_duration_since(t));
            }
        }
        batch.iter().map(|_| Ok(())).collect()
    }
    fn ordered_batches(&self) -> bool {
        true
    }
}

/// Commit-to-publish latency under load on PostgreSQL: `WRITERS` tasks share a steady total
/// rate, one message per transaction on 50 keys; keep-order rows are published by a relay in
/// the same process (loop mode, defaults, NOTIFY wake-up), publish-on-commit rows by the
/// writer after COMMIT. The clock starts just before COMMIT and stops at the publisher.
async fn latency_under_load(secs: u64) -> Res {
    const WRITERS: usize = 4;
    const KEYS: usize = 50;
    println!("\n## Commit-to-publish latency under load (PostgreSQL, {WRITERS} writers, {KEYS} keys, {secs} s per rate, in-process publisher)\n");
    println!("| rate | path | p50 | p99 | max | delivered | machine CPU busy |");
    println!("|---|---|---|---|---|---|---|");
    let mut misses = Vec::new();
    for rate in [100usize, 500, 2_000] {
        for keep_order in [true, false] {
            let b = bench_store("postgres", std::path::Path::new("/")).await?;
            let pg = b.pg.clone().unwrap();
            let total = rate * secs as usize;
            let stamp = Stamp {
                marks: Arc::new((0..total).map(|_| Mutex::new(None)).collect()),
                samples: Arc::new(Mutex::new(Vec::with_capacity(total))),
            };
            let outbox = if keep_order {
                Outbox::builder(pg.clone(), stamp.clone())
                    .strategy(KeepOrder::default())
                    .build()?
            } else {
                Outbox::builder(pg.clone(), stamp.clone()).build()?
            };
            let (stop, mut stop_rx) = tokio::sync::watch::channel(false);
            let relay = if keep_order {
                // OUTBOX_BENCH_LATENCY_CONCURRENCY=n: the relay with n batches in flight
                // (default 1), to see what concurrency buys at these rates.
                let concurrency = std::env::var("OUTBOX_BENCH_LATENCY_CONCURRENCY")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1);
                let relay = Relay::builder(pg.reopen().await?, stamp.clone())
                    .concurrency(concurrency)
                    .build()?;
                let h = tokio::spawn(async move {
                    relay
                        .run(async move {
                            let _ = stop_rx.wait_for(|s| *s).await;
                        })
                        .await
                });
                tokio::time::sleep(Duration::from_millis(300)).await;
                Some(h)
            } else {
                None
            };
            let cpu = cpu_times();
            let writers = (0..WRITERS).map(|w| {
                let (pg, outbox, stamp) = (pg.clone(), outbox.clone(), stamp.clone());
                tokio::spawn(async move {
                    let period = Duration::from_secs_f64(WRITERS as f64 / rate as f64);
                    let mut tick = tokio::time::interval_at(
                        tokio::time::Instant::now() + period.mul_f64(w as f64 / WRITERS as f64),
                        period,
                    );
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                    for i in (w..total).step_by(WRITERS) {
                        tick.tick().await;
                        let m = Message::new("x", i.to_string().into_bytes())
                            .key(format!("k{}", i % KEYS));
                        let mut tx = pg.pool().begin().await?;
                        let after = outbox.enqueue(&mut tx, [m]).await?;
                        *stamp.marks[i].lock().unwrap() = Some(Instant::now());
                        outbox::postgres::commit(tx, after).await?;
                    }
                    Res::Ok(())
                })
            });
            for w in futures_util::future::join_all(writers).await {
                w??;
            }
            let busy = cpu_busy(cpu);
            let deadline = Instant::now() + Duration::from_secs(30);
            while stamp.samples.lock().unwrap().len() < total && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let _ = stop.send(true);
            if let Some(h) = relay {
                h.await?;
            }
            let mut s = stamp.samples.lock().unwrap().clone();
            s.sort();
            let (p50, p99) = (percentile(&s, 0.5), percentile(&s, 0.99));
            let path = if keep_order {
                "keep-order"
            } else {
                "publish-on-commit"
            };
            println!(
                "| {rate} msg/s | {path} | {} | {} | {} | {}/{total} | {busy} |",
                ms(p50),
                ms(p99),
                ms(s.last().copied().unwrap_or_default()),
                s.len()
            );
            let ms_ = |d: Duration| d.as_secs_f64() * 1000.0;
            match (keep_order, rate) {
                (true, 100) if ms_(p50) > 2.0 => {
                    misses.push(format!("keep-order p50 at 100 msg/s {}", ms(p50)))
                }
                (true, 2_000) if ms_(p99) > 5.0 => {
                    misses.push(format!("keep-order p99 at 2 000 msg/s {}", ms(p99)))
                }
                (false, 2_000) if ms_(p99) > 2.0 => {
                    misses.push(format!("publish-on-commit p99 at 2 000 msg/s {}", ms(p99)))
                }
                _ => {}
            }
            b.cleanup().await;
        }
    }
    println!(
        "\nTargets: keep-order p50 <= 2 ms at 100 msg/s, p99 <= 5 ms at 2 000 msg/s; publish-on-commit p99 <= 2 ms at 2 000 msg/s: {}.",
        if misses.is_empty() { "met".to_owned() } else { format!("MISSES {}", misses.join("; ")) }
    );
    Ok(())
}

fn print_latency(name: &str, s: &[Duration], expected: usize) {
    println!(
        "| {name} | {} | {} | {} | {}/{expected} |",
        ms(percentile(s, 0.5)),
        ms(percentile(s, 0.99)),
        ms(s.last().copied().unwrap_or_default()),
        s.len()
    );
}

fn summary(mut v: Vec<Duration>, total: Duration) -> (Duration, Duration, f64) {
    v.sort();
    (
        percentile(&v, 0.5),
        percentile(&v, 0.99),
        v.len() as f64 / total.as_secs_f64(),
    )
}

/// Time `n` business transactions three ways: without the outbox (mode 0), with a keep-order
/// row (mode 1), with a publish-on-commit row (mode 2); print p50 / p99 / tx/s and overheads.
async fn overhead<F, Fut>(name: &str, n: usize, mut business_tx: F) -> Res
where
    F: FnMut(usize, u8) -> Fut,
    Fut: std::future::Future<Output = Res>,
{
    // Modes interleaved transaction by transaction, so drift (autovacuum, checkpoints, other
    // load) spreads over all of them alike; and in OVERHEAD_ROUNDS rounds, whose keep-order /
    // bare ratios are reported with their median, so one slow moment cannot decide it.
    let mut samples: Vec<Vec<Duration>> = (0..4).map(|_| Vec::with_capacity(n)).collect();
    let mut totals = [Duration::ZERO; 4];
    let per_round = n.div_ceil(OVERHEAD_ROUNDS);
    let mut ratios = Vec::with_capacity(OVERHEAD_ROUNDS);
    for round in 0..OVERHEAD_ROUNDS {
        let mut this: Vec<Vec<Duration>> = (0..4).map(|_| Vec::with_capacity(per_round)).collect();
        for i in round * per_round..((round + 1) * per_round).min(n) {
            for mode in 0..4u8 {
                let t = Instant::now();
                business_tx(i, mode).await?;
                let d = t.elapsed();
                this[mode as usize].push(d);
                totals[mode as usize] += d;
            }
        }
        let p50 = |v: &mut Vec<Duration>| {
            v.sort();
            percentile(v, 0.5).as_secs_f64()
        };
        ratios.push(p50(&mut this[1]) / p50(&mut this[3]));
        for (all, v) in samples.iter_mut().zip(this) {
            all.extend(v);
        }
    }
    let results: Vec<_> = samples
        .into_iter()
        .zip(totals)
        .map(|(v, total)| summary(v, total))
        .collect();
    ratios.sort_by(f64::total_cmp);
    print_overhead(name, &results, &ratios);
    Ok(())
}

/// Rounds of the overhead section (see [`overhead`]).
const OVERHEAD_ROUNDS: usize = 5;

/// The bare-table baseline: the outbox row's columns, no index but the primary key.
const BARE_COLUMNS: &str = "id ID_TYPE, stream TEXT, destination TEXT, msg_key TEXT, okey TEXT, payload BLOB, \
     content_type TEXT, headers JSON_TEXT, strategy TEXT, status TEXT, attempts INT, created_at BIGINT, next_attempt_at BIGINT";
const BARE_NAMES: &str = "id, stream, destination, msg_key, okey, payload, content_type, headers, strategy, status, attempts, created_at, next_attempt_at";

/// The values of [`order_message`]'s outbox row.
struct BareRow {
    id: String,
    stream: &'static str,
    destination: &'static str,
    key: String,
    payload: Vec<u8>,
    content_type: &'static str,
    headers: &'static str,
    strategy: &'static str,
    status: &'static str,
    attempts: i32,
    created_at: i64,
}

impl BareRow {
    fn new(i: usize) -> Self {
        Self {
            id: MessageId::new().to_string(),
            stream: "default",
            destination: "orders",
            key: format!("c{}", i % 100),
            payload: i.to_string().into_bytes(),
            content_type: "application/octet-stream",
            headers: "{}",
            strategy: "keep_order",
            status: "pending",
            attempts: 0,
            created_at: outbox::to_millis(SystemTime::now()),
        }
    }
}

fn order_message(i: usize) -> Message {
    Message::new("orders", i.to_string().into_bytes()).key(format!("c{}", i % 100))
}

async fn write_overhead(dir: &std::path::Path) -> Res {
    let n = 2000;
    println!("\n## Business transaction cost with and without the outbox row ({n} sequential transactions each)\n");
    println!("The publish-on-commit column runs the real path: commit, then the after-commit publish (null publisher) and mark-sent, awaited.\n");
    println!("| store | without outbox: p50 / p99 / tx/s | + keep-order row | overhead (p50) | + publish-on-commit row, published and marked sent | overhead (p50) | + the same row in a bare table (PK only) | overhead (p50) | keep-order / bare (p50, median of rounds) |");
    println!("|---|---|---|---|---|---|---|---|---|");

    let table = unique("outbox_w");
    let pg = PgStore::connect_with(
        &pg_url(),
        PgOptions {
            table: table.clone(),
            ..Default::default()
        },
    )
    .await?;
    pg.migrate().await?;
    for ddl in [
        format!("CREATE TABLE {table}_biz (id BIGSERIAL PRIMARY KEY, body TEXT)"),
        format!("CREATE TABLE {table}_bare (seq BIGSERIAL PRIMARY KEY, {BARE_COLUMNS})")
            .replace("BLOB", "BYTEA")
            .replace("JSON_TEXT", "JSONB")
            .replace("ID_TYPE", "UUID"),
    ] {
        outbox::postgres::sqlx::query(&ddl)
            .execute(pg.pool())
            .await?;
    }
    let bare = format!("INSERT INTO {table}_bare ({BARE_NAMES}) VALUES ($1::uuid, $2, $3, $4, $5, $6, $7, $8::jsonb, $9, $10, $11, $12, $13)");
    let outboxes = [
        Outbox::builder(pg.clone(), NullPublisher)
            .strategy(KeepOrder::default())
            .build()?,
        Outbox::builder(pg.clone(), NullPublisher).build()?,
    ];
    let insert = format!("INSERT INTO {table}_biz (body) VALUES ($1)");
    overhead("postgres", n, |i, mode| {
        let (pg, insert, outboxes, bare) =
            (pg.clone(), insert.clone(), outboxes.clone(), bare.clone());
        async move {
            let mut tx = pg.pool().begin().await?;
            outbox::postgres::sqlx::query(&insert)
                .bind(format!("order {i}"))
                .execute(&mut *tx)
                .await?;
            if mode == 3 {
                let v = BareRow::new(i);
                outbox::postgres::sqlx::query(&bare)
                    .bind(v.id)
                    .bind(v.stream)
                    .bind(v.destination)
                    .bind(v.key.clone())
                    .bind(v.key)
                    .bind(v.payload)
                    .bind(v.content_type)
                    .bind(v.headers)
                    .bind(v.strategy)
                    .bind(v.status)
                    .bind(v.attempts)
                    .bind(v.created_at)
                    .bind(v.created_at)
                    .execute(&mut *tx)
                    .await?;
            } else if mode > 0 {
                // The real path: commit, then the after-commit publish and mark-sent
                // (publish-on-commit; keep-order only wakes relays), awaited so the
                // transaction's cost includes them.
                let after = outboxes[mode as usize - 1]
                    .enqueue(&mut tx, [order_message(i)])
                    .await?;
                tx.commit().await?;
                after.publish().await;
                return Ok(());
            }
            tx.commit().await?;
            Ok(())
        }
    })
    .await?;
    let _ = outbox::postgres::sqlx::query(&format!(
        "DROP TABLE {table}, {table}_units, {table}_due, {table}_schema, {table}_biz, {table}_bare"
    ))
    .execute(pg.pool())
    .await;

    let table = unique("outbox_w");
    let my = MySqlStore::connect_with(
        &mysql_url(),
        MySqlOptions {
            table: table.clone(),
            ..Default::default()
        },
    )
    .await?;
    my.migrate().await?;
    for ddl in [
        format!("CREATE TABLE {table}_biz (id BIGINT AUTO_INCREMENT PRIMARY KEY, body TEXT)"),
        format!(
            "CREATE TABLE {table}_bare (seq BIGINT AUTO_INCREMENT PRIMARY KEY, {BARE_COLUMNS})"
        )
        .replace("JSON_TEXT", "LONGTEXT")
        .replace(" TEXT", " VARCHAR(255)")
        .replace("BLOB", "LONGBLOB")
        .replace("ID_TYPE", "CHAR(36)"),
    ] {
        outbox::mysql::sqlx::query(&ddl).execute(my.pool()).await?;
    }
    let bare = format!(
        "INSERT INTO {table}_bare ({BARE_NAMES}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    );
    let outboxes = [
        Outbox::builder(my.clone(), NullPublisher)
            .strategy(KeepOrder::default())
            .build()?,
        Outbox::builder(my.clone(), NullPublisher).build()?,
    ];
    let insert = format!("INSERT INTO {table}_biz (body) VALUES (?)");
    overhead("mariadb", n, |i, mode| {
        let (my, insert, outboxes, bare) =
            (my.clone(), insert.clone(), outboxes.clone(), bare.clone());
        async move {
            let mut tx = my.pool().begin().await?;
            outbox::mysql::sqlx::query(&insert)
                .bind(format!("order {i}"))
                .execute(&mut *tx)
                .await?;
            if mode == 3 {
                let v = BareRow::new(i);
                outbox::mysql::sqlx::query(&bare)
                    .bind(v.id)
                    .bind(v.stream)
                    .bind(v.destination)
                    .bind(v.key.clone())
                    .bind(v.key)
                    .bind(v.payload)
                    .bind(v.content_type)
                    .bind(v.headers)
                    .bind(v.strategy)
                    .bind(v.status)
                    .bind(v.attempts)
                    .bind(v.created_at)
                    .bind(v.created_at)
                    .execute(&mut *tx)
                    .await?;
            } else if mode > 0 {
                // The real path: commit, then the after-commit publish and mark-sent
                // (publish-on-commit; keep-order only wakes relays), awaited so the
                // transaction's cost includes them.
                let after = outboxes[mode as usize - 1]
                    .enqueue(&mut tx, [order_message(i)])
                    .await?;
                tx.commit().await?;
                after.publish().await;
                return Ok(());
            }
            tx.commit().await?;
            Ok(())
        }
    })
    .await?;
    let _ = outbox::mysql::sqlx::query(&format!(
        "DROP TABLE {table}, {table}_locks, {table}_due, {table}_schema, {table}_biz, {table}_bare"
    ))
    .execute(my.pool())
    .await;

    let store = SqliteStore::open(dir.join("write.db"))?;
    store.migrate_now()?;
    let outboxes = [
        Outbox::builder(store.clone(), NullPublisher)
            .strategy(KeepOrder::default())
            .build()?,
        Outbox::builder(store.clone(), NullPublisher).build()?,
    ];
    let mut conn = store.connect()?;
    conn.execute_batch("CREATE TABLE biz (id INTEGER PRIMARY KEY, body TEXT)")?;
    conn.execute_batch(
        &format!("CREATE TABLE bare (seq INTEGER PRIMARY KEY AUTOINCREMENT, {BARE_COLUMNS})")
            .replace("JSON_TEXT", "TEXT")
            .replace("ID_TYPE", "TEXT"),
    )?;
    // rusqlite is synchronous: each transaction runs inside the call, the future is ready.
    overhead("sqlite", n, |i, mode| {
        let mut run = || -> Res<Option<outbox::AfterCommit>> {
            let mut tx = conn.transaction()?;
            tx.execute("INSERT INTO biz (body) VALUES (?1)", [format!("order {i}")])?;
            if mode == 3 {
                let v = BareRow::new(i);
                tx.execute(
                    &format!("INSERT INTO bare ({BARE_NAMES}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"),
                    outbox::sqlite::rusqlite::params![
                        v.id, v.stream, v.destination, v.key.clone(), v.key, v.payload, v.content_type,
                        v.headers, v.strategy, v.status, v.attempts, v.created_at, v.created_at
                    ],
                )?;
            } else if mode > 0 {
                let after = outboxes[mode as usize - 1].enqueue_blocking(&mut tx, [order_message(i)])?;
                tx.commit()?;
                return Ok(Some(after));
            }
            tx.commit()?;
            Ok(None)
        };
        // The after-commit publish and mark-sent are part of the measured transaction.
        let done = run();
        async move {
            if let Some(after) = done? {
                after.publish().await;
            }
            Ok(())
        }
    })
    .await?;
    println!("\nTarget: a transaction with the keep-order outbox row costs <= 1.15 x the same transaction writing the same row to a bare table with only a primary key (the median of {OVERHEAD_ROUNDS} rounds' p50 ratios).");
    Ok(())
}

/// One store's row of the overhead table; `ratios`: keep-order / bare per round, sorted.
fn print_overhead(name: &str, r: &[(Duration, Duration, f64)], ratios: &[f64]) {
    let cell = |x: (Duration, Duration, f64)| format!("{} / {} / {:.0}", ms(x.0), ms(x.1), x.2);
    let over =
        |x: (Duration, Duration, f64)| (x.0.as_secs_f64() / r[0].0.as_secs_f64() - 1.0) * 100.0;
    let median = ratios[ratios.len() / 2];
    let rounds: Vec<String> = ratios.iter().map(|x| format!("{x:.2}")).collect();
    println!(
        "| {name} | {} | {} | {:+.1}% | {} | {:+.1}% | {} | {:+.1}% | {median:.2} ({}; rounds {}) |",
        cell(r[0]),
        cell(r[1]),
        over(r[1]),
        cell(r[2]),
        over(r[2]),
        cell(r[3]),
        over(r[3]),
        verdict(median <= 1.15),
        rounds.join(", ")
    );
}

/// Child process: drain the SQLite backlog at `path` with a null publisher, print peak RSS.
async fn rss_child(path: &str) -> Res {
    let store = SqliteStore::open(path)?;
    let relay = Relay::builder(store, NullPublisher)
        .batch_size(BATCH)
        .delete_after_send(true)
        .build()?;
    let t = Instant::now();
    let r = relay.run_once().await?;
    let status = std::fs::read_to_string("/proc/self/status")?;
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .unwrap_or("VmHWM: ?")
        .to_owned();
    println!(
        "{} {} {:.0}",
        r.published,
        hwm.split_whitespace().nth(1).unwrap_or("?"),
        rate(r.published, t.elapsed())
    );
    Ok(())
}

async fn memory_and_idle(dir: &std::path::Path, rss_rows: usize) -> Res {
    println!("\n## Relay memory and idle cost\n");
    let path = dir.join("rss.db");
    let store = SqliteStore::open(&path)?;
    store.migrate_now()?;
    let t = Instant::now();
    fill(&store, rss_rows, "x").await?;
    let filled = t.elapsed();
    let out = std::process::Command::new(std::env::current_exe()?)
        .args(["--rss-child", path.to_str().unwrap()])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut parts = text.split_whitespace();
    let (published, hwm_kb, r) = (
        parts.next().unwrap_or("?"),
        parts.next().unwrap_or("?"),
        parts.next().unwrap_or("?"),
    );
    let mb = hwm_kb
        .parse::<f64>()
        .map(|k| k / 1024.0)
        .unwrap_or(f64::NAN);
    println!(
        "- peak RSS of a relay process draining a {rss_rows}-row SQLite backlog (filled in {:.1} s): {mb:.1} MB ({published} published at {r} msg/s) - {}",
        filled.as_secs_f64(),
        verdict(mb < 30.0)
    );

    let table = unique("outbox_idle");
    let pg = PgStore::connect_with(
        &pg_url(),
        PgOptions {
            table: table.clone(),
            ..Default::default()
        },
    )
    .await?;
    pg.migrate().await?;
    let counting = Arc::new(Counting {
        inner: pg.clone(),
        claims: AtomicU64::new(0),
    });
    let relay = Relay::builder(counting.clone(), NullPublisher).build()?; // default 1 s poll interval
    let (stop, mut stop_rx) = tokio::sync::watch::channel(false);
    let h = tokio::spawn(async move {
        relay
            .run(async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            })
            .await
    });
    let idle = Duration::from_secs(10);
    tokio::time::sleep(idle).await;
    stop.send(true)?;
    h.await?;
    let q = counting.claims.load(Ordering::Relaxed) as f64 / idle.as_secs_f64();
    println!("- idle relay (PostgreSQL, default 1 s poll interval, LISTEN for wake-up): {q:.2} claim queries/s");
    let _ = outbox::postgres::sqlx::query(&format!("DROP TABLE {table}"))
        .execute(pg.pool())
        .await;
    Ok(())
}

/// The stores of the keep-order sections: OUTBOX_BENCH_STORES=postgres,sqlite picks some.
fn bench_kinds() -> Vec<&'static str> {
    let only = std::env::var("OUTBOX_BENCH_STORES").unwrap_or_default();
    ["postgres", "mariadb", "sqlite"]
        .into_iter()
        .filter(|k| only.is_empty() || only.split(',').any(|o| o == *k))
        .collect()
}

/// A keep-order row of unit `key` on the default stream.
fn keyed_row(destination: &str, i: usize, key: &str) -> NewMessage {
    let mut r = row(destination, i);
    r.order = Order::InUnit;
    r.unit = key.to_owned();
    r.envelope.message = r.envelope.message.key(key);
    r
}

/// `n` keep-order rows on `keys` units (`k0`, `k1`, ...; row i in unit i % keys), or all in
/// unit `only` when given.
async fn fill_keyed(
    store: &dyn StoreAdmin,
    n: usize,
    keys: usize,
    only: Option<&str>,
    dest: &str,
) -> Res {
    let mut i = 0;
    while i < n {
        let chunk: Vec<NewMessage> = (i..(i + 2000).min(n))
            .map(|j| match only {
                Some(k) => keyed_row(dest, j, k),
                None => keyed_row(dest, j, &format!("k{}", j % keys)),
            })
            .collect();
        i += chunk.len();
        store.insert(&chunk).await?;
    }
    Ok(())
}

async fn drain_with(
    store: Arc<dyn StoreAdmin>,
    publisher: Arc<dyn Publisher>,
    batch: usize,
) -> Res<usize> {
    let relay = Relay::builder(store, publisher)
        .batch_size(batch)
        .delete_after_send(true)
        .build()?;
    let mut published = 0;
    loop {
        let r = relay.run_once().await?;
        published += r.published;
        if r.claimed == 0 {
            return Ok(published);
        }
    }
}

/// Keep-order at scale: drain rate against the backlog, and the other units' rate while one
/// unit is stuck with a deep backlog behind its head.
async fn keep_order_scale(dir: &std::path::Path, sizes: &[usize], stuck: &[usize]) -> Res {
    println!("\n## Keep-order drain rate against the backlog (50 units, relay -> null, batch {BATCH}, delete after send)\n");
    print!("| store |");
    for n in sizes {
        print!(" {n} rows |");
    }
    println!(" largest / smallest |");
    println!("|---|{}---|", "---|".repeat(sizes.len()));
    let mut stats_cost: Vec<(&str, Vec<Duration>)> = Vec::new();
    for kind in bench_kinds() {
        let mut rates = Vec::new();
        let mut stats_took = Vec::new();
        for &n in sizes {
            let b = bench_store(kind, dir).await?;
            fill_keyed(b.store.as_ref(), n, 50, None, "x").await?;
            b.maintain().await;
            // The CLI's backlog gauges run this query (only with --metrics-addr).
            let t = Instant::now();
            b.store.stats().await?;
            stats_took.push(t.elapsed());
            let (got, r) =
                timed(drain_with(b.store.clone(), Arc::new(NullPublisher), BATCH)).await?;
            assert_eq!(got, n);
            rates.push(r);
            b.cleanup().await;
        }
        print!("| {kind} |");
        for r in &rates {
            print!(" {r:.0} msg/s |");
        }
        let ratio = rates.last().unwrap() / rates[0];
        println!(" {ratio:.2} ({}) |", verdict(ratio >= 0.8));
        stats_cost.push((kind, stats_took));
    }
    println!("\nTarget: the largest backlog drains at >= 0.8 x the smallest's rate.");

    println!("\n## The stats query behind the CLI's backlog gauges, against the backlog\n");
    println!("The relay runs it only with --metrics-addr, then waits max(5 s, 20 x its time): its share of time (and of one connection) stays <= 5%.\n");
    print!("| store |");
    for n in sizes {
        print!(" {n} rows: query / refresh every |");
    }
    println!();
    println!("|---|{}", "---|".repeat(sizes.len()));
    for (kind, took) in stats_cost {
        print!("| {kind} |");
        for t in took {
            let every = Duration::from_secs(5).max(t * 20);
            print!(" {} / {:.0} s |", ms(t), every.as_secs_f64());
        }
        println!();
    }

    head_of_line(dir, stuck, false).await?;
    head_of_line(dir, stuck, true).await
}

/// The admin console's listing (`StoreAdmin::messages`) against the table's size: the first page,
/// a page deep in the table, and pages filtered to rare rows, against a one-row primary-key
/// read (`StoreAdmin::get`) as the floor.
async fn listing(dir: &std::path::Path, sizes: &[usize]) -> Res {
    use outbox::MessageFilter;
    println!(
        "\n## Admin console listing (StoreAdmin::messages, pages of 50) against the table size\n"
    );
    println!("Rows: 1 in 100 on stream \"rare\", 1 in 1000 dead, 50 keys. Median of 5 runs.\n");
    println!("| store | rows | get(seq) (floor) | first page | deep page (before = 1000) | stream = rare | status = dead | key = k7 | id = … |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for kind in bench_kinds() {
        for &n in sizes {
            let b = bench_store(kind, dir).await?;
            let mut i = 0;
            while i < n {
                let chunk: Vec<NewMessage> = (i..(i + 2000).min(n))
                    .map(|j| {
                        let mut r = keyed_row("x", j, &format!("k{}", j % 50));
                        if j % 100 == 7 {
                            r.envelope.message.stream = "rare".into();
                        }
                        if j % 1000 == 3 {
                            r.status = Status::Dead;
                        }
                        r
                    })
                    .collect();
                b.store.insert(&chunk).await?;
                i += chunk.len();
            }
            b.maintain().await;
            let first = b.store.messages(&MessageFilter::default()).await?;
            let top = first.first().map(|m| m.seq).unwrap_or(1);
            let id = b.store.get(top - 10).await?.map(|m| m.envelope.id);
            let time = |f: MessageFilter| {
                let store = b.store.clone();
                async move {
                    let mut took = Vec::new();
                    for _ in 0..5 {
                        let t = Instant::now();
                        store.messages(&f).await?;
                        took.push(t.elapsed());
                    }
                    took.sort();
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(took[2])
                }
            };
            let mut floor = Vec::new();
            for _ in 0..5 {
                let t = Instant::now();
                b.store.get(top - 10).await?;
                floor.push(t.elapsed());
            }
            floor.sort();
            let cells = [
                time(MessageFilter::default()).await?,
                time(MessageFilter {
                    before: Some(top - (n as i64) + 1000),
                    ..Default::default()
                })
                .await?,
                time(MessageFilter {
                    stream: Some("rare".into()),
                    ..Default::default()
                })
                .await?,
                time(MessageFilter {
                    status: Some(Status::Dead),
                    ..Default::default()
                })
                .await?,
                time(MessageFilter {
                    key: Some("k7".into()),
                    ..Default::default()
                })
                .await?,
                time(MessageFilter {
                    id,
                    ..Default::default()
                })
                .await?,
            ];
            print!("| {kind} | {n} | {} |", ms(floor[2]));
            for c in cells {
                print!(" {} |", ms(c));
            }
            println!();
            b.cleanup().await;
        }
    }
    println!("\nTarget: every page within 50 ms on 1 000 000 rows.");
    Ok(())
}

/// Other units drain while one unit holds N rows: its head backing off for an hour
/// (`parked` false), or the unit parked (true).
async fn head_of_line(dir: &std::path::Path, stuck: &[usize], parked: bool) -> Res {
    let free = 5_000;
    let how = if parked {
        "one unit is parked with N rows in it"
    } else {
        "one unit's head backs off with N rows behind it"
    };
    println!("\n## Head-of-line: {free} rows on 50 units drain while {how} (relay -> null, batch {BATCH})\n");
    print!("| store |");
    for n in stuck {
        print!(" N = {n} |");
    }
    println!(" largest N / N = 0 |");
    println!("|---|{}---|", "---|".repeat(stuck.len()));
    for kind in bench_kinds() {
        let mut rates = Vec::new();
        for &n in stuck {
            let b = bench_store(kind, dir).await?;
            if n > 0 && parked {
                fill_keyed(b.store.as_ref(), n, 1, Some("stuck"), "x").await?;
                b.store
                    .park_unit(outbox::DEFAULT_STREAM, "stuck", "bench")
                    .await?;
            } else if n > 0 {
                fill_keyed(b.store.as_ref(), n, 1, Some("stuck"), "x").await?;
                // The stuck unit's head fails once: it now backs off for an hour.
                let claim = Claim::new("bench", StreamFilter::All, 1, Duration::from_secs(60));
                let head = b.store.claim(&claim).await?;
                let seq = match &head[..] {
                    [Ok(m)] => m.seq,
                    other => {
                        return Err(
                            format!("expected the stuck head, got {} rows", other.len()).into()
                        )
                    }
                };
                b.store
                    .settle(
                        "bench",
                        &[],
                        false,
                        &[Failure {
                            seq,
                            error: "consumer down".into(),
                            outcome: outbox::Outcome::Retry {
                                after: Duration::from_secs(3600),
                            },
                        }],
                    )
                    .await?;
            }
            fill_keyed(b.store.as_ref(), free, 50, None, "x").await?;
            b.maintain().await;
            let (got, r) =
                timed(drain_with(b.store.clone(), Arc::new(NullPublisher), BATCH)).await?;
            assert_eq!(got, free);
            rates.push(r);
            b.cleanup().await;
        }
        print!("| {kind} |");
        for r in &rates {
            print!(" {r:.0} msg/s |");
        }
        let ratio = rates.last().unwrap() / rates[0];
        println!(" {ratio:.2} ({}) |", verdict(ratio >= 0.67));
    }
    println!("\nTarget: with the largest N, the other units drain at >= 0.67 x their rate with nothing stuck.");
    Ok(())
}

/// One keep-order unit to Redis against the same rows as publish-on-commit rows.
async fn one_unit(n: usize) -> Res {
    println!("\n## One unit, {n} messages, PostgreSQL -> Redis streams (delete after send)\n");
    println!("| batch | keep-order, one unit | publish-on-commit | ratio |");
    println!("|---|---|---|---|");
    let redis = Arc::new(
        RedisPublisher::connect(&redis_url())
            .await?
            .streams(Some(100_000)),
    );
    let key = unique("outbox-one-");
    for batch in [100, 500] {
        let b = bench_store("postgres", std::path::Path::new("/")).await?;
        fill_keyed(b.store.as_ref(), n, 1, Some("one"), &key).await?;
        b.maintain().await;
        let (got, ko) = timed(drain_with(b.store.clone(), redis.clone(), batch)).await?;
        assert_eq!(got, n);
        fill(b.store.as_ref(), n, &key).await?;
        b.maintain().await;
        let (got, oc) = timed(drain_with(b.store.clone(), redis.clone(), batch)).await?;
        assert_eq!(got, n);
        b.cleanup().await;
        println!(
            "| {batch} | {ko:.0} msg/s | {oc:.0} msg/s | {:.2} ({}) |",
            ko / oc,
            verdict(ko / oc >= 0.8)
        );
    }
    let mut conn = outbox::redis::redis::Client::open(redis_url())?
        .get_multiplexed_async_connection()
        .await?;
    let _: () = outbox::redis::redis::AsyncCommands::del(&mut conn, &key).await?;
    println!("\nTarget: keep-order >= 0.8 x publish-on-commit (the relay pipelines a unit's run to a publisher that keeps batch order).");
    Ok(())
}

/// Takes a fixed time per batch, whatever its size; keeps a batch's order when `ordered` (as
/// Kafka, RabbitMQ, Redis and NATS do: a unit's run goes in one call), otherwise gets waves
/// (one row per unit per call).
struct Sleepy {
    per_call: Duration,
    ordered: bool,
}

#[async_trait]
impl Publisher for Sleepy {
    async fn publish(&self, _env: &Envelope) -> outbox::Result<()> {
        tokio::time::sleep(self.per_call).await;
        Ok(())
    }
    async fn publish_batch(&self, batch: &[&Envelope]) -> Vec<outbox::Result<()>> {
        tokio::time::sleep(self.per_call).await;
        batch.iter().map(|_| Ok(())).collect()
    }
    fn ordered_batches(&self) -> bool {
        self.ordered
    }
}

/// Child process: a relay on PostgreSQL table `table` with a publisher taking `ms` per batch
/// (keeping its order when `ordered`) and `concurrency` batches at once, until killed.
async fn relay_child(table: &str, batch: usize, ms: u64, concurrency: usize, ordered: bool) -> Res {
    let pg = PgStore::connect_with(
        &pg_url(),
        PgOptions {
            table: table.into(),
            ..Default::default()
        },
    )
    .await?;
    let publisher = Sleepy {
        per_call: Duration::from_millis(ms),
        ordered,
    };
    let relay = Relay::builder(pg, publisher)
        .batch_size(batch)
        .concurrency(concurrency)
        .delete_after_send(true)
        .poll_interval(Duration::from_millis(50))
        .build()?;
    relay.run(std::future::pending::<()>()).await;
    Ok(())
}

/// The machine's CPU time so far (all cores, Linux's `/proc/stat`): busy and total ticks.
fn cpu_times() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let idle = ticks.get(3)? + ticks.get(4).copied().unwrap_or(0);
    let total: u64 = ticks.iter().take(8).sum();
    Some((total - idle, total))
}

/// How busy the machine's cores were since `since` (a percentage), or "n/a".
fn cpu_busy(since: Option<(u64, u64)>) -> String {
    match (since, cpu_times()) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
            format!("{:.0}%", (b1 - b0) as f64 * 100.0 / (t1 - t0) as f64)
        }
        _ => "n/a".into(),
    }
}

/// 1, 2 and 4 relay processes on one PostgreSQL table, then one process running 2 and 4
/// batches at once, with a publisher taking `ms` per batch: a wave (one row per unit, as a
/// publisher that does not keep a batch's order gets keep-order rows), or, when `ordered`, a
/// publisher that keeps a batch's order (its relays claim a few units' runs per batch).
async fn relays(n: usize, units: usize, ms: u64, ordered: bool) -> Res {
    let batch: usize = std::env::var("OUTBOX_BENCH_RELAY_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let kind = if ordered {
        "keeps a batch's order"
    } else {
        "one row per unit per call"
    };
    println!("\n## Relays on one PostgreSQL table ({n} keep-order rows on {units} units, publisher {ms} ms per batch ({kind}), batch {batch})\n");
    println!("| relay processes x batches at once | drain rate | / one relay | machine CPU busy |");
    println!("|---|---|---|---|");
    // A unit's next row waits for its previous one's publish: `units` rows per `ms` at most
    // when each call carries one row per unit; a publisher that keeps a batch's order takes
    // a unit's run per call, so the units bound nothing below `batch` rows each.
    let per_call = if ordered { batch.min(n / units) } else { 1 };
    let bound = (units * per_call) as f64 * 1000.0 / ms as f64;
    let mut one = 0.0;
    let mut verdicts = Vec::new();
    for (k, conc) in [(1usize, 1usize), (2, 1), (4, 1), (1, 2), (1, 4)] {
        let b = bench_store("postgres", std::path::Path::new("/")).await?;
        let table = b.pg.as_ref().unwrap().table().to_owned();
        fill_keyed(b.store.as_ref(), n, units, None, "x").await?;
        b.maintain().await;
        let t = Instant::now();
        let cpu = cpu_times();
        let mut children = Vec::new();
        for _ in 0..k {
            children.push(
                std::process::Command::new(std::env::current_exe()?)
                    .args([
                        "--relay-child",
                        &table,
                        &batch.to_string(),
                        &ms.to_string(),
                        &conc.to_string(),
                        if ordered { "ordered" } else { "waves" },
                    ])
                    .stdout(std::process::Stdio::null())
                    .spawn()?,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let left: i64 = outbox::postgres::sqlx::query_scalar(&format!(
                "SELECT count(*) FROM {table} WHERE status = 'pending'"
            ))
            .fetch_one(b.pg.as_ref().unwrap().pool())
            .await?;
            if left == 0 || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let r = rate(n, t.elapsed());
        let busy = cpu_busy(cpu);
        for mut c in children {
            let _ = c.kill();
            let _ = c.wait();
        }
        b.cleanup().await;
        if (k, conc) == (1, 1) {
            one = r;
        }
        let ratio = r / one;
        let parallel = k * conc;
        // Where the units allow it (the bound above), a slow publisher's relays add up;
        // with a fast one the machine bounds them: never slower than one.
        let target = if ms >= 20 {
            (3.0f64).min(0.9 * bound / one)
        } else {
            1.0
        };
        let judged = if parallel > 1 && (parallel == 4 || ms < 20) {
            let ok = ratio >= target * 0.95;
            verdicts.push(ok);
            format!(" ({}, target {target:.2})", verdict(ok))
        } else {
            String::new()
        };
        println!("| {k} x {conc} | {r:.0} msg/s | {ratio:.2}{judged} | {busy} |");
    }
    println!(
        "\nBound set by the units: {units} units x {per_call} row(s) per call / {ms} ms = {bound:.0} msg/s ({:.2} x one relay). Targets: with a publisher of 20 ms or more, 4 relays (or one relay running 4 batches) >= 3 x one, or 0.9 x the bound where that is lower; with a faster one, more relays never slower than one (within 5%): {}. Rates include process start-up and connecting (each relay is a fresh process).",
        bound / one,
        if verdicts.iter().all(|&v| v) { "met" } else { "MISSED" }
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Res {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--rss-child") {
        return rss_child(&args[2]).await;
    }
    if args.get(1).map(String::as_str) == Some("--fleet-child") {
        return fleet::child(&args[2], &args[3], args[4].parse()?, args[5].parse()?).await;
    }
    if args.get(1).map(String::as_str) == Some("--fleet-pg-child") {
        return fleet::pg_child(&args[2], &args[3], args[4].parse()?, args[5].parse()?).await;
    }
    if args.get(1).map(String::as_str) == Some("--relay-child") {
        return relay_child(
            &args[2],
            args[3].parse()?,
            args[4].parse()?,
            args[5].parse()?,
            args.get(6).map(String::as_str) == Some("ordered"),
        )
        .await;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let arg = |name: &str, default: usize| -> usize {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let rows = arg("--rows", if quick { 10_000 } else { 100_000 });
    let rss_rows = arg("--rss-rows", if quick { 100_000 } else { 1_000_000 });
    let dir = tempfile::tempdir()?;
    println!("# outbox benchmarks");
    println!(
        "\nmachine: {} cores; all services on loopback; release build",
        std::thread::available_parallelism()?.get()
    );
    // --only a,b: run these sections only (throughput, latency, overhead, memory, keep-order,
    // one-unit, relays).
    let only: Option<Vec<String>> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.split(',').map(str::to_owned).collect());
    let run = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == name));
    if run("throughput") {
        throughput(dir.path(), rows).await?;
    }
    if run("latency") {
        latency().await?;
        latency_under_load(if quick { 3 } else { 10 }).await?;
    }
    if run("overhead") {
        write_overhead(dir.path()).await?;
    }
    if run("memory") {
        memory_and_idle(dir.path(), rss_rows).await?;
    }
    if run("keep-order") {
        let custom = |name: &str| -> Option<Vec<usize>> {
            args.iter()
                .position(|a| a == name)
                .and_then(|i| args.get(i + 1))
                .map(|v| v.split(',').filter_map(|x| x.parse().ok()).collect())
        };
        let (sizes, stuck): (Vec<usize>, Vec<usize>) =
            if let (Some(a), Some(b)) = (custom("--backlogs"), custom("--stuck")) {
                (a, b)
            } else if quick {
                (vec![10_000, 100_000], vec![0, 20_000, 100_000])
            } else {
                (
                    vec![10_000, 100_000, 1_000_000],
                    vec![0, 20_000, 200_000, 1_000_000],
                )
            };
        keep_order_scale(dir.path(), &sizes, &stuck).await?;
    }
    if run("one-unit") {
        one_unit(20_000).await?;
    }
    if run("listing") {
        let sizes = args
            .iter()
            .position(|a| a == "--listing-rows")
            .and_then(|i| args.get(i + 1))
            .map(|v| v.split(',').filter_map(|x| x.parse().ok()).collect())
            .unwrap_or_else(|| {
                if quick {
                    vec![100_000]
                } else {
                    vec![100_000, 1_000_000]
                }
            });
        listing(dir.path(), &sizes).await?;
    }
    if run("inbox") {
        inbox_section(
            dir.path(),
            arg("--inbox-messages", if quick { 2_000 } else { 10_000 }),
        )
        .await?;
    }
    if run("wal") {
        wal::section(quick, None).await?;
    }
    if run("fleet") {
        fleet::section(quick).await?;
    }
    for part in ["writer", "latency", "drain"] {
        if only
            .as_ref()
            .is_some_and(|o| o.iter().any(|x| *x == format!("wal-{part}")))
        {
            wal::section(quick, Some(part)).await?;
        }
    }
    if run("relays") {
        // A fast publisher (2 ms per batch: the machine's two cores bound the relays), then
        // an HTTP webhook's typical round trip (50 ms: the publisher bounds one relay, and
        // relays add up as far as the units allow) on 200 and on 1 000 units; then a
        // publisher that keeps a batch's order (Kafka, RabbitMQ, Redis, NATS) on 200 units.
        let n = if quick { 20_000 } else { 50_000 };
        let only_ordered = std::env::var("OUTBOX_BENCH_RELAYS_ORDERED_ONLY").is_ok();
        for (units, ms, ordered) in [
            (1_000, 2, false),
            (200, 2, false),
            (200, 50, false),
            (1_000, 50, false),
            (200, 2, true),
            (200, 50, true),
        ] {
            if ordered || !only_ordered {
                relays(n, units, ms, ordered).await?;
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------- inbox

/// An effects table and an inbox table in `db` ("postgres" or "sqlite"), and a function that
/// runs the bare handler (its own transaction: BEGIN, INSERT, COMMIT) for one message.
struct InboxDb {
    inbox: Box<dyn outbox::Inbox>,
    bare: BareHandler,
}

async fn inbox_db(db: &str, dir: &std::path::Path) -> Res<InboxDb> {
    let name = unique("inbox");
    let effects = format!("{name}_fx");
    match db {
        "postgres" => {
            use outbox::postgres::sqlx;
            let store = PgStore::connect(&pg_url()).await?;
            let table = store.inbox_table(&name)?;
            table.migrate().await?;
            sqlx::query(&format!("CREATE TABLE {effects} (msg TEXT NOT NULL)"))
                .execute(store.pool())
                .await?;
            let pool = store.pool().clone();
            let fx = effects.clone();
            let handler = outbox::sql_inbox::handler_fn::<sqlx::Postgres, _>(move |tx, m| {
                let q = format!("INSERT INTO {fx} (msg) VALUES ($1)");
                Box::pin(async move {
                    sqlx::query(&q)
                        .bind(m.id.to_string())
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| {
                            outbox::Error::handler(outbox::Retry::Transient, e.to_string())
                        })?;
                    Ok(())
                })
            });
            let inbox = Box::new(table.consumer("bench", handler)?);
            let bare_q = format!("INSERT INTO {effects} (msg) VALUES ($1)");
            Ok(InboxDb {
                inbox,
                bare: Box::new(move |id| {
                    let (pool, q) = (pool.clone(), bare_q.clone());
                    Box::pin(async move {
                        let mut tx = pool.begin().await?;
                        sqlx::query(&q).bind(id).execute(&mut *tx).await?;
                        tx.commit().await?;
                        Ok(())
                    })
                }),
            })
        }
        _ => {
            let store = SqliteStore::open(dir.join(format!("{name}.db")))?;
            let table = store.inbox_table(&name)?;
            table.migrate_now()?;
            store
                .connect()?
                .execute_batch(&format!("CREATE TABLE {effects} (msg TEXT NOT NULL)"))?;
            let fx = effects.clone();
            let inbox = Box::new(table.consumer(
                "bench",
                move |tx: &outbox::sqlite::rusqlite::Transaction<'_>, m: &outbox::Received| {
                    tx.execute(
                        &format!("INSERT INTO {fx} (msg) VALUES (?1)"),
                        [m.id.to_string()],
                    )
                    .map_err(outbox::sqlite::map_err)?;
                    Ok(())
                },
            )?);
            let conn = Arc::new(Mutex::new(store.connect()?));
            Ok(InboxDb {
                inbox,
                bare: Box::new(move |id| {
                    let (conn, fx) = (conn.clone(), effects.clone());
                    Box::pin(async move {
                        tokio::task::spawn_blocking(move || -> Res {
                            let mut c = conn.lock().unwrap();
                            let tx = c.transaction()?;
                            tx.execute(&format!("INSERT INTO {fx} (msg) VALUES (?1)"), [id])?;
                            tx.commit()?;
                            Ok(())
                        })
                        .await?
                    })
                }),
            })
        }
    }
}

/// The inbox's cost per message against the same handler in the same kind of transaction
/// without it, then consumer throughput per broker: a bare receive-and-ack loop of the source
/// against the consumer with an inbox on PostgreSQL, on the same number of messages.
async fn inbox_section(dir: &std::path::Path, n: usize) -> Res {
    println!("\n## inbox (consumer side)\n");
    println!("Cost per message: the handler (one INSERT) in its own transaction, without and with the inbox (attempts counted per batch of 100, the mark in the handler's transaction), {n} messages.\n");
    println!("| database | bare handler msg/s | with inbox msg/s | cost ratio | target ≤ 1.15× |");
    println!("|---|---|---|---|---|");
    for db in ["postgres", "sqlite"] {
        let d = inbox_db(db, dir).await?;
        // Five rounds; within a round the two modes alternate every 100 messages, so a slow
        // moment of the machine (a checkpoint, autovacuum, a neighbour) hits both alike; the
        // median of the five rounds' ratios is reported.
        let round = (n / 5).max(100);
        let (mut bare_t, mut with_t, mut ratios) = (Duration::ZERO, Duration::ZERO, Vec::new());
        for _ in 0..5 {
            let (mut b, mut w) = (Duration::ZERO, Duration::ZERO);
            let msgs: Vec<outbox::Received> = (0..round)
                .map(|_| outbox::Received::new(MessageId::new(), "bench", b"x".to_vec()))
                .collect();
            for chunk in msgs.chunks(100) {
                let t = Instant::now();
                for _ in chunk {
                    (d.bare)(MessageId::new().to_string()).await?;
                }
                b += t.elapsed();
                let t = Instant::now();
                let ids: Vec<MessageId> = chunk.iter().map(|m| m.id).collect();
                d.inbox.start(&ids).await?;
                for m in chunk {
                    d.inbox.process(m).await?;
                }
                w += t.elapsed();
            }
            bare_t += b;
            with_t += w;
            ratios.push(w.as_secs_f64() / b.as_secs_f64());
        }
        ratios.sort_by(f64::total_cmp);
        let ratio = ratios[2];
        println!(
            "| {db} | {:.0} | {:.0} | {ratio:.2}× (rounds {:.2}–{:.2}) | {} |",
            rate(round * 5, bare_t),
            rate(round * 5, with_t),
            ratios[0],
            ratios[4],
            verdict(ratio <= 1.15)
        );
    }

    println!("\nBatched mode (`Consumer::batched`): the same handler, one transaction per 100 messages (attempts counted, then marks and handler writes committed together), against the bare handler's own transaction per message, alternating every 100 messages, {n} messages.\n");
    println!("| database | bare handler msg/s | inbox, batched msg/s | batched / bare | target (PostgreSQL) >= 10 000 msg/s |");
    println!("|---|---|---|---|---|");
    for db in ["postgres", "sqlite"] {
        let d = inbox_db(db, dir).await?;
        let (mut b, mut w) = (Duration::ZERO, Duration::ZERO);
        let msgs: Vec<outbox::Received> = (0..n)
            .map(|_| outbox::Received::new(MessageId::new(), "bench", b"x".to_vec()))
            .collect();
        for chunk in msgs.chunks(100) {
            let t = Instant::now();
            for _ in chunk {
                (d.bare)(MessageId::new().to_string()).await?;
            }
            b += t.elapsed();
            let t = Instant::now();
            let ids: Vec<MessageId> = chunk.iter().map(|m| m.id).collect();
            d.inbox.start(&ids).await?;
            let refs: Vec<&outbox::Received> = chunk.iter().collect();
            match d.inbox.process_batch(&refs).await? {
                outbox::BatchProcessed::Committed(_) => {}
                outbox::BatchProcessed::Failed { error, .. } => return Err(error.into()),
            }
            w += t.elapsed();
        }
        let (bare, batched) = (rate(n, b), rate(n, w));
        println!(
            "| {db} | {bare:.0} | {batched:.0} | {:.1}× | {} |",
            batched / bare,
            if db == "postgres" {
                verdict(batched >= 10_000.0).to_string()
            } else {
                "-".into()
            }
        );
    }

    println!("\nConsumer throughput per broker, {n} messages each: the source alone (receive, acknowledge) against `Consumer` with the inbox on PostgreSQL (receive, count attempts, one transaction per message, acknowledge).\n");
    println!("| broker | bare receive+ack msg/s | + the handler in its own transaction msg/s | consumer with inbox msg/s | inbox vs handler alone | consumer with inbox, batched mode msg/s |");
    println!("|---|---|---|---|---|---|");
    for broker in ["redis", "amqp", "kafka", "nats"] {
        let r = broker_modes(broker, n, dir).await?;
        println!(
            "| {broker} | {:.0} | {:.0} | {:.0} | {:.2}× | {:.0} |",
            r[0],
            r[1],
            r[2],
            r[1] / r[2],
            r[3]
        );
    }
    Ok(())
}

/// Publish `n` messages to a fresh destination and drain it with `drive`, three times:
/// receive and acknowledge only; the same plus the bare handler in its own transaction per
/// message (an at-least-once consumer); the consumer with the inbox.
async fn broker_modes(broker: &str, n: usize, dir: &std::path::Path) -> Res<Vec<f64>> {
    let mut rates = Vec::new();
    let cluster = outbox::kafka::rdkafka::mocking::MockCluster::new(1)?;
    for mode in 0..4 {
        let name = unique(&format!("bench_{broker}"));
        let envelopes: Vec<Envelope> = (0..n)
            .map(|i| Envelope {
                id: MessageId::new(),
                created_at: SystemTime::now(),
                message: Message::new(name.clone(), i.to_string().into_bytes())
                    .key(format!("k{}", i % 8)),
            })
            .collect();
        let batch: Vec<&Envelope> = envelopes.iter().collect();
        let mode = match mode {
            0 => Mode::Bare,
            1 => Mode::Handler(inbox_db("postgres", dir).await?.bare),
            2 => Mode::Inbox(inbox_db("postgres", dir).await?.inbox),
            _ => Mode::Batched(inbox_db("postgres", dir).await?.inbox),
        };
        let r = match broker {
            "redis" => {
                let p = RedisPublisher::connect(&redis_url()).await?;
                for c in batch.chunks(500) {
                    p.publish_batch(c).await;
                }
                let s = outbox::redis::RedisStreamSource::connect(&redis_url(), &name, "g", "m")
                    .await?;
                drive(s, mode, n).await?
            }
            "amqp" => {
                let conn = lapin::Connection::connect(&amqp_url(), Default::default()).await?;
                let ch = conn.create_channel().await?;
                ch.queue_declare(name.as_str().into(), Default::default(), Default::default())
                    .await?;
                let p = AmqpPublisher::connect(&amqp_url()).await?;
                for c in batch.chunks(500) {
                    p.publish_batch(c).await;
                }
                let s = outbox::amqp::AmqpSource::connect(&amqp_url(), &name)
                    .await?
                    .prefetch(500)
                    .await?;
                let r = drive(s, mode, n).await?;
                ch.queue_delete(name.as_str().into(), Default::default())
                    .await?;
                r
            }
            "kafka" => {
                cluster.create_topic(&name, 2, 1)?;
                let p = outbox::kafka::KafkaPublisher::new(&cluster.bootstrap_servers())?;
                for c in batch.chunks(500) {
                    p.publish_batch(c).await;
                }
                let s =
                    outbox::kafka::KafkaSource::new(&cluster.bootstrap_servers(), &name, &[&name])?;
                drive(s, mode, n).await?
            }
            _ => {
                let url = env_or("OUTBOX_NATS_URL", "nats://127.0.0.1:4222");
                let p = outbox::nats::NatsPublisher::connect(&url).await?;
                p.jetstream()
                    .create_stream(outbox::nats::async_nats::jetstream::stream::Config {
                        name: name.clone(),
                        subjects: vec![name.clone()],
                        ..Default::default()
                    })
                    .await?;
                for c in batch.chunks(500) {
                    p.publish_batch(c).await;
                }
                let s = outbox::nats::NatsSource::connect(&p, &name, "g").await?;
                let r = drive(s, mode, n).await?;
                p.jetstream().delete_stream(&name).await?;
                r
            }
        };
        rates.push(r);
    }
    Ok(rates)
}

type BareHandler = Box<
    dyn Fn(String) -> std::pin::Pin<Box<dyn std::future::Future<Output = Res> + Send>>
        + Send
        + Sync,
>;

enum Mode {
    Bare,
    Handler(BareHandler),
    Inbox(Box<dyn outbox::Inbox>),
    /// The consumer in batched mode (one transaction per batch).
    Batched(Box<dyn outbox::Inbox>),
}

/// Drain `n` messages: with no inbox, receive and acknowledge batches of 100; with one,
/// run the consumer. The clock starts at the first delivery (connecting and joining a
/// consumer group are not throughput).
async fn drive<S: outbox::Source>(mut source: S, mode: Mode, n: usize) -> Res<f64> {
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut started: Option<(Instant, usize)> = None;
    let mut done = 0usize;
    let (handler, mut consumer) = match mode {
        Mode::Bare => (None, None),
        Mode::Handler(h) => (Some(h), None),
        Mode::Inbox(i) => (None, Some(outbox::Consumer::new(PassSource(None), i))),
        Mode::Batched(i) => (
            None,
            Some(outbox::Consumer::new(PassSource(None), i).batched(true)),
        ),
    };
    while done < n {
        if Instant::now() > deadline {
            return Err(format!("stalled at {done} of {n}").into());
        }
        let batch = source.receive(100, Duration::from_millis(200)).await?;
        if batch.is_empty() {
            continue;
        }
        let got = batch.len();
        match consumer.as_mut() {
            None => {
                if let Some(h) = &handler {
                    for d in &batch {
                        let id = d
                            .message
                            .as_ref()
                            .map(|m| m.id.to_string())
                            .unwrap_or_default();
                        h(id).await?;
                    }
                }
                source
                    .ack(batch.into_iter().map(|d| d.token).collect())
                    .await?
            }
            Some(c) => {
                // The consumer's own round on this batch: attempts, one transaction per
                // message, then the acknowledgement through the real source.
                let (messages, tokens): (Vec<_>, Vec<_>) =
                    batch.into_iter().map(|d| (d.message, d.token)).unzip();
                c.source_mut().0 = Some(messages);
                let r = c.run_once().await?;
                if r.processed as usize != got {
                    return Err(format!("consumer processed {} of {got}", r.processed).into());
                }
                source.ack(tokens).await?;
            }
        }
        if started.is_none() {
            started = Some((Instant::now(), got));
        }
        done += got;
    }
    let (t, first) = started.expect("at least one batch");
    Ok(rate(n - first, t.elapsed()))
}

/// Hands the consumer one batch received from the real source (whose tokens the caller
/// acknowledges), so both modes receive the same way.
struct PassSource(Option<Vec<Result<outbox::Received, outbox::Unreadable>>>);

#[async_trait]
impl outbox::Source for PassSource {
    type Token = ();
    async fn receive(
        &mut self,
        _max: usize,
        _wait: Duration,
    ) -> outbox::Result<Vec<outbox::Incoming<()>>> {
        Ok(self
            .0
            .take()
            .unwrap_or_default()
            .into_iter()
            .map(|message| outbox::Incoming { message, token: () })
            .collect())
    }
    async fn ack(&mut self, _tokens: Vec<()>) -> outbox::Result<()> {
        Ok(())
    }
}
