//! The WAL relay against the polling relay, one run, one machine (issue #34): the writer's
//! cost per transaction (table-less message, keep-order row, bare transaction), commit to
//! publish latency under load, and drain throughput against a bare replication-stream read.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox::postgres::sqlx::{self, Postgres, Transaction};
use outbox::postgres::wal::{WalRelay, WalStore};
use outbox::postgres::{PgOptions, PgStore};
use outbox::{Enqueue, KeepOrder, Message, Outbox, Relay, Store};

use super::{cpu_busy, cpu_times, ms, percentile, pg_url, unique, Res, Stamp};

struct Setup {
    pg: PgStore,
    wal: WalStore,
    slot: String,
}

async fn setup() -> Res<Setup> {
    let table = unique("outbox_wal_b");
    let pg = PgStore::connect_with(
        &pg_url(),
        PgOptions {
            table: table.clone(),
            max_connections: 8,
            ..Default::default()
        },
    )
    .await?;
    let wal = WalStore::new(pg.clone(), &table)?;
    wal.setup(&table, "outbox_wal_bench").await?;
    Ok(Setup {
        pg,
        wal,
        slot: table,
    })
}

impl Setup {
    async fn cleanup(&self) {
        let pool = self.pg.pool();
        let deadline = Instant::now() + Duration::from_secs(10);
        while sqlx::query("SELECT pg_drop_replication_slot($1)")
            .bind(&self.slot)
            .execute(pool)
            .await
            .is_err()
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let t = self.pg.table();
        let _ = sqlx::query(&format!(
            "DROP TABLE IF EXISTS {t}, {t}_units, {t}_due, {t}_schema, {t}_biz, {t}_wal CASCADE"
        ))
        .execute(pool)
        .await;
    }

    fn relay(&self, publisher: impl outbox::Publisher + 'static) -> Res<WalRelay> {
        Ok(WalRelay::builder(&pg_url(), self.wal.clone(), publisher)
            .slot(&self.slot)
            .publication("outbox_wal_bench")
            .build()?)
    }
}

/// A null broker that counts (and keeps batch order, as a pipelining broker client).
#[derive(Clone, Default)]
struct Count(
    Arc<std::sync::atomic::AtomicUsize>,
    Arc<Mutex<Option<Instant>>>,
);

impl Count {
    fn count(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[outbox::async_trait]
impl outbox::Publisher for Count {
    async fn publish(&self, _: &outbox::Envelope) -> outbox::Result<()> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
    async fn publish_batch(&self, batch: &[&outbox::Envelope]) -> Vec<outbox::Result<()>> {
        self.1.lock().unwrap().get_or_insert_with(Instant::now);
        self.0
            .fetch_add(batch.len(), std::sync::atomic::Ordering::Relaxed);
        batch.iter().map(|_| Ok(())).collect()
    }
    fn ordered_batches(&self) -> bool {
        true
    }
}

/// All three parts, or one (`--only wal-writer`, `wal-latency`, `wal-drain`).
pub async fn section(quick: bool, part: Option<&str>) -> Res {
    let level = setup_probe().await?;
    if level != "logical" {
        println!("\n## WAL relay: skipped, the server has wal_level = {level} (scripts/setup.sh sets logical)");
        return Ok(());
    }
    let part = |p: &str| part.is_none_or(|x| x == p);
    if part("writer") {
        writer_cost(if quick { 1_000 } else { 2_000 }).await?;
    }
    if part("latency") {
        latency(if quick { 3 } else { 10 }).await?;
    }
    if part("drain") {
        drain(if quick { 20_000 } else { 100_000 }).await?;
    }
    Ok(())
}

async fn setup_probe() -> Res<String> {
    let pool = sqlx::PgPool::connect(&pg_url()).await?;
    let level: String = sqlx::query_scalar("SELECT current_setting('wal_level')")
        .fetch_one(&pool)
        .await?;
    Ok(level)
}

/// Writer cost: a business INSERT alone, with a keep-order row (polling table), and with a
/// table-less message; interleaved transaction by transaction, ratios per round.
async fn writer_cost(n: usize) -> Res {
    const ROUNDS: usize = 5;
    println!("\n## WAL relay: the writer's cost per transaction (PostgreSQL, {n} sequential transactions each, interleaved)\n");
    let s = setup().await?;
    let t = s.pg.table().to_owned();
    sqlx::query(&format!(
        "CREATE TABLE {t}_biz (id BIGSERIAL PRIMARY KEY, body TEXT)"
    ))
    .execute(s.pg.pool())
    .await?;
    let polling = Outbox::writer(s.pg.clone())
        .strategy(KeepOrder::default())
        .build()?;
    let wal = Outbox::writer(s.wal.clone())
        .strategy(KeepOrder::default())
        .build()?;
    // Table mode: the append-only `<table>_wal` (the statement `setup` runs for it).
    let create = outbox::postgres::wal::setup_sql_rows(&s.slot, "outbox_wal_bench", &t)?;
    sqlx::query(&create[0]).execute(s.pg.pool()).await?;
    let rows = Outbox::writer(WalStore::rows(s.pg.clone()))
        .strategy(KeepOrder::default())
        .build()?;
    let biz = format!("INSERT INTO {t}_biz (body) VALUES ($1)");
    let mut all: [Vec<Duration>; 6] = Default::default();
    let mut with_commit_ratio = Vec::new();
    let mut wal_ratio = Vec::new();
    let mut row_ratio = Vec::new();
    let mut trip_ratio = Vec::new();
    let mut rows_ratio = Vec::new();
    let per = n / ROUNDS;
    for round in 0..ROUNDS {
        let mut this: [Vec<Duration>; 6] = Default::default();
        for i in round * per..(round + 1) * per {
            for (mode, samples) in this.iter_mut().enumerate() {
                let m = Message::new("orders", format!("{{\"order\":{i}}}"))
                    .key(format!("c{}", i % 50));
                let t0 = Instant::now();
                let mut tx = s.pg.pool().begin().await?;
                sqlx::query(&biz).bind("order").execute(&mut *tx).await?;
                match mode {
                    1 => drop(polling.enqueue(&mut tx, [m]).await?),
                    2 => drop(wal.enqueue(&mut tx, [m]).await?),
                    4 => drop(rows.enqueue(&mut tx, [m]).await?),
                    3 => {
                        sqlx::query("SELECT 1").execute(&mut *tx).await?;
                    }
                    5 => {
                        // The message rides with the COMMIT.
                        outbox::postgres::wal::commit_with(tx, &wal, [m]).await?;
                        samples.push(t0.elapsed());
                        continue;
                    }
                    _ => {}
                }
                tx.commit().await?;
                samples.push(t0.elapsed());
            }
        }
        for v in this.iter_mut() {
            v.sort();
        }
        let p = |v: &Vec<Duration>| percentile(v, 0.5).as_secs_f64();
        row_ratio.push(p(&this[1]) / p(&this[0]));
        wal_ratio.push(p(&this[2]) / p(&this[0]));
        trip_ratio.push(p(&this[3]) / p(&this[0]));
        rows_ratio.push(p(&this[4]) / p(&this[0]));
        with_commit_ratio.push(p(&this[5]) / p(&this[0]));
        for (a, v) in all.iter_mut().zip(this) {
            a.extend(v);
        }
    }
    for v in all.iter_mut() {
        v.sort();
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let fmt = |v: &Vec<f64>| {
        v.iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("| writer | p50 | p99 | / bare (p50, median of {ROUNDS} rounds) | rounds |");
    println!("|---|---|---|---|---|");
    println!(
        "| bare transaction (BEGIN, INSERT, COMMIT) | {} | {} | 1.00 | |",
        ms(percentile(&all[0], 0.5)),
        ms(percentile(&all[0], 0.99))
    );
    let mut w = 0.0;
    for (label, mode, ratios) in [
        ("+ keep-order row (polling table)", 1, &mut row_ratio),
        (
            "+ table-less message (WAL), `enqueue` then `commit`",
            2,
            &mut wal_ratio,
        ),
        (
            "+ table-less message sent with the COMMIT (`wal::commit_with`)",
            5,
            &mut with_commit_ratio,
        ),
        ("+ WAL row (table mode: `<table>_wal`)", 4, &mut rows_ratio),
        (
            "+ `SELECT 1` (one more round trip, nothing written)",
            3,
            &mut trip_ratio,
        ),
    ] {
        let rounds = fmt(ratios);
        let m = med(ratios);
        if mode == 5 {
            w = m;
        }
        println!(
            "| {label} | {} | {} | {m:.2} | {rounds} |",
            ms(percentile(&all[mode], 0.5)),
            ms(percentile(&all[mode], 0.99)),
        );
    }
    println!(
        "\nTarget: table-less (with the COMMIT) <= 1.10 x bare: {} ({w:.3}).",
        if w <= 1.10 { "met" } else { "MISSED" }
    );
    s.cleanup().await;
    Ok(())
}

/// Commit-to-publish latency under load, 4 writers, 50 keys: the WAL relay against the
/// polling relay (loop mode, NOTIFY), each with an in-process publisher.
async fn latency(secs: u64) -> Res {
    const WRITERS: usize = 4;
    println!("\n## WAL relay: commit-to-publish latency under load ({WRITERS} writers, 50 keys, {secs} s per rate)\n");
    println!("| rate | relay | p50 | p99 | max | delivered | machine CPU busy |");
    println!("|---|---|---|---|---|---|---|");
    for rate in [500usize, 2_000] {
        for wal_mode in [true, false] {
            let s = setup().await?;
            let total = rate * secs as usize;
            let stamp = Stamp {
                marks: Arc::new((0..total).map(|_| Mutex::new(None)).collect()),
                samples: Arc::new(Mutex::new(Vec::with_capacity(total))),
            };
            let (stop, stop_rx) = tokio::sync::watch::channel(false);
            let wait = move || {
                let mut rx = stop_rx.clone();
                async move {
                    let _ = rx.wait_for(|s| *s).await;
                }
            };
            let relay = if wal_mode {
                let relay = s.relay(stamp.clone())?;
                let w = wait();
                tokio::spawn(async move { relay.run(w).await.map(|_| ()) })
            } else {
                let relay = Relay::builder(s.pg.reopen().await?, stamp.clone()).build()?;
                let w = wait();
                tokio::spawn(async move {
                    relay.run(w).await;
                    Ok(())
                })
            };
            tokio::time::sleep(Duration::from_millis(500)).await;
            let cpu = cpu_times();
            if wal_mode {
                let o = Outbox::writer(s.wal.clone())
                    .strategy(KeepOrder::default())
                    .build()?;
                write_at(o, &s.pg, &stamp, rate, total, WRITERS).await?;
            } else {
                let o = Outbox::writer(s.pg.clone())
                    .strategy(KeepOrder::default())
                    .build()?;
                write_at(o, &s.pg, &stamp, rate, total, WRITERS).await?;
            }
            let busy = cpu_busy(cpu);
            let deadline = Instant::now() + Duration::from_secs(30);
            while stamp.samples.lock().unwrap().len() < total && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let _ = stop.send(true);
            relay.await??;
            let mut v = stamp.samples.lock().unwrap().clone();
            v.sort();
            println!(
                "| {rate} msg/s | {} | {} | {} | {} | {}/{total} | {busy} |",
                if wal_mode {
                    "WAL"
                } else {
                    "polling (keep-order)"
                },
                ms(percentile(&v, 0.5)),
                ms(percentile(&v, 0.99)),
                ms(v.last().copied().unwrap_or_default()),
                v.len()
            );
            s.cleanup().await;
        }
    }
    println!("\nTarget: WAL p99 <= 5 ms at 2 000 msg/s.");
    Ok(())
}

async fn write_at<S>(
    outbox: Outbox<S>,
    pg: &PgStore,
    stamp: &Stamp,
    rate: usize,
    total: usize,
    writers: usize,
) -> Res
where
    S: Store + for<'c> Enqueue<Transaction<'c, Postgres>> + Clone + 'static,
{
    let tasks = (0..writers).map(|w| {
        let (pool, outbox, stamp) = (pg.pool().clone(), outbox.clone(), stamp.clone());
        tokio::spawn(async move {
            let period = Duration::from_secs_f64(writers as f64 / rate as f64);
            let mut tick = tokio::time::interval_at(
                tokio::time::Instant::now() + period.mul_f64(w as f64 / writers as f64),
                period,
            );
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            for i in (w..total).step_by(writers) {
                tick.tick().await;
                let m = Message::new("x", i.to_string().into_bytes()).key(format!("k{}", i % 50));
                let mut tx = pool.begin().await?;
                let _ = outbox.enqueue(&mut tx, [m]).await?;
                *stamp.marks[i].lock().unwrap() = Some(Instant::now());
                tx.commit().await?;
            }
            Res::Ok(())
        })
    });
    for t in futures_util::future::join_all(tasks).await {
        t??;
    }
    Ok(())
}

/// Drain: `n` messages committed (100 per transaction, 50 keys) before any relay runs, then
/// read by a bare replication stream (no decoding, no publishing), by the WAL relay, and by
/// the polling relay from a keep-order table of the same messages.
async fn drain(n: usize) -> Res {
    println!("\n## WAL relay: drain of {n} messages written before the relay starts (100 per transaction, 50 keys, null publisher)\n");
    let s = setup().await?;
    // One slot per reader, all at the same position: the relay (s.slot) and the bare read
    // over TLS, and the same two in plain text. The relay's default is sslmode=prefer, which
    // is TLS wherever the server offers it, so each is compared on its own transport.
    let slot = |what: &str| format!("{}_{what}", s.slot);
    let extra = [slot("bare_tls"), slot("bare_plain"), slot("relay_plain")];
    for name in &extra {
        sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
            .bind(name)
            .execute(s.pg.pool())
            .await?;
    }
    let polling = {
        let pg = PgStore::connect_with(
            &pg_url(),
            PgOptions {
                table: unique("outbox_wal_p"),
                ..Default::default()
            },
        )
        .await?;
        pg.migrate().await?;
        pg
    };
    let wal_writer = Outbox::writer(s.wal.clone())
        .strategy(KeepOrder::default())
        .build()?;
    let poll_writer = Outbox::writer(polling.clone())
        .strategy(KeepOrder::default())
        .build()?;
    for t in 0..n / 100 {
        let msgs = |_: ()| -> Vec<Message> {
            (0..100)
                .map(|j| {
                    Message::new("x", format!("{}", t * 100 + j))
                        .key(format!("k{}", (t * 100 + j) % 50))
                })
                .collect()
        };
        let mut tx = s.pg.pool().begin().await?;
        let _ = wal_writer.enqueue(&mut tx, msgs(())).await?;
        tx.commit().await?;
        let mut tx = polling.pool().begin().await?;
        let _ = poll_writer.enqueue(&mut tx, msgs(())).await?;
        tx.commit().await?;
    }
    let result = drain_readers(&s, &extra, &polling, n).await;
    drain_cleanup(&s, &extra, &polling).await;
    result
}

/// The readers of [`drain`], one after the other, and the table.
async fn drain_readers(s: &Setup, extra: &[String; 3], polling: &PgStore, n: usize) -> Res {
    let tls = bare_read(&extra[0], n, true).await;
    let plain = bare_read(&extra[1], n, false).await?;
    let wal_tls = relay_drain(s, &s.slot, &with_sslmode(&pg_url(), "require"), n).await;
    // For profiling the WAL relay alone: OUTBOX_BENCH_WAL_ONLY=1 stops here (after the
    // clean-up: a slot left behind keeps WAL on the server for good).
    if std::env::var_os("OUTBOX_BENCH_WAL_ONLY").is_some() {
        if let Ok(r) = &wal_tls {
            println!("\nWAL relay only (TLS): {:.0} msg/s, {r:?}", r.rate(n));
        }
        return Ok(());
    }
    let wal_plain = relay_drain(s, &extra[2], &with_sslmode(&pg_url(), "disable"), n).await?;

    let count2 = Count::default();
    let relay = Relay::builder(polling.clone(), count2.clone()).build()?;
    let (stop, mut rx) = tokio::sync::watch::channel(false);
    let t0 = Instant::now();
    let h = tokio::spawn(async move {
        relay
            .run(async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await;
    });
    while count2.count() < n {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let poll = t0.elapsed();
    let _ = stop.send(true);
    h.await?;

    println!("Each reader reads its own slot from the same position to the last message. The bare read is `pgwire-replication` alone: no decoding, no publishing. \"Steady\" counts from each reader's first message, leaving out connecting.\n");
    println!("| transport | reader | time | msg/s | steady msg/s | / bare, steady | machine busy | this process's CPU |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut verdicts = Vec::new();
    let mut rows = |transport: &str, bare: &Drained, relay: &Drained| {
        let ratio = relay.steady(n) / bare.steady(n);
        verdicts.push((transport.to_owned(), ratio));
        println!("| {transport} | bare replication stream | {:.2?} | {:.0} | {:.0} | 1.00 | {} | {} ms |", bare.time, bare.rate(n), bare.steady(n), bare.busy, bare.own_ms);
        println!("| {transport} | WAL relay (decode, check, publish, confirm) | {:.2?} | {:.0} | {:.0} | {ratio:.2} | {} | {} ms |", relay.time, relay.rate(n), relay.steady(n), relay.busy, relay.own_ms);
    };
    match (&tls, &wal_tls) {
        (Ok(bare), Ok(relay)) => rows("TLS", bare, relay),
        (Err(e), _) | (_, Err(e)) => println!("| TLS | skipped: {e} | | | | | | |"),
    }
    rows("plain text", &plain, &wal_plain);
    println!(
        "| plain text | polling relay (claim, publish, settle) | {poll:.2?} | {:.0} | | {:.2} (of the whole bare read) | | |",
        n as f64 / poll.as_secs_f64(),
        (n as f64 / poll.as_secs_f64()) / plain.rate(n)
    );
    for (transport, ratio) in verdicts {
        println!(
            "\nTarget, {transport}: WAL relay >= 0.8 x the bare stream on the same transport (steady): {}.",
            if ratio >= 0.8 { "met" } else { "MISSED" }
        );
    }
    Ok(())
}

/// One reader's drain: its time, when its first message came, and the CPU it took.
#[derive(Debug)]
struct Drained {
    time: Duration,
    first: Duration,
    busy: String,
    own_ms: u64,
}

impl Drained {
    fn rate(&self, n: usize) -> f64 {
        n as f64 / self.time.as_secs_f64()
    }

    fn steady(&self, n: usize) -> f64 {
        n as f64 / (self.time - self.first).as_secs_f64()
    }
}

/// The URL with `sslmode` set to `mode` (any query it had is replaced).
fn with_sslmode(url: &str, mode: &str) -> String {
    format!("{}?sslmode={mode}", url.split('?').next().unwrap_or(url))
}

/// Read `slot` until every transaction's logical message has arrived (one per transaction:
/// 100 small messages make one), with nothing else done.
async fn bare_read(slot: &str, n: usize, tls: bool) -> Res<Drained> {
    let url = url_parts();
    let cfg = pgwire_replication::ReplicationConfig::new(
        url.0,
        url.1,
        "",
        url.2,
        slot.to_owned(),
        "outbox_wal_bench",
    )
    .with_port(url.3)
    .with_tls(if tls {
        pgwire_replication::TlsConfig::require()
    } else {
        pgwire_replication::TlsConfig::disabled()
    });
    let (cpu0, own0) = (cpu_times(), own_cpu_ms());
    let t0 = Instant::now();
    let mut client = pgwire_replication::ReplicationClient::connect(cfg).await?;
    let mut messages = 0usize;
    let mut first = None;
    while messages < n / 100 {
        match client.recv().await? {
            Some(pgwire_replication::ReplicationEvent::Message { .. }) => {
                first.get_or_insert_with(Instant::now);
                messages += 1
            }
            Some(_) => {}
            None => break,
        }
    }
    let time = t0.elapsed();
    Ok(Drained {
        time,
        first: first.map(|f| f - t0).unwrap_or_default(),
        busy: cpu_busy(cpu0),
        own_ms: own_cpu_ms() - own0,
    })
}

/// The WAL relay on `slot` through `url` until it has published `n` messages.
async fn relay_drain(s: &Setup, slot: &str, url: &str, n: usize) -> Res<Drained> {
    let count = Count::default();
    let relay = WalRelay::builder(url, s.wal.clone(), count.clone())
        .slot(slot)
        .publication("outbox_wal_bench")
        .build()?;
    let (stop, mut rx) = tokio::sync::watch::channel(false);
    let (cpu0, own0) = (cpu_times(), own_cpu_ms());
    let t0 = Instant::now();
    let h = tokio::spawn(async move {
        relay
            .run(async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await
    });
    let deadline = t0 + Duration::from_secs(120);
    while count.count() < n {
        if h.is_finished() || Instant::now() > deadline {
            let _ = stop.send(true);
            h.await??;
            return Err(
                format!("the relay stopped after {} of {n} messages", count.count()).into(),
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let time = t0.elapsed();
    let (busy, own_ms) = (cpu_busy(cpu0), own_cpu_ms() - own0);
    let first = count.1.lock().unwrap().map(|f| f - t0).unwrap_or_default();
    let _ = stop.send(true);
    h.await??;
    Ok(Drained {
        time,
        first,
        busy,
        own_ms,
    })
}

/// This process's CPU time so far (user and system, all threads), in milliseconds, from
/// `/proc/self/stat` (10 ms ticks); 0 where there is none.
fn own_cpu_ms() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and stime are the 12th
    // and 13th after the closing parenthesis.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    f.iter().sum::<u64>() * 10
}

/// Drop what the drain section made: the readers' slots, the polling table, the rest.
async fn drain_cleanup(s: &Setup, slots: &[String], polling: &PgStore) {
    for slot in slots {
        // A reader's walsender may hold its slot a moment after the reader stops.
        let deadline = Instant::now() + Duration::from_secs(10);
        while sqlx::query(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(slot)
        .execute(s.pg.pool())
        .await
        .is_err()
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let t = polling.table().to_owned();
    let _ = sqlx::query(&format!(
        "DROP TABLE IF EXISTS {t}, {t}_units, {t}_due, {t}_schema CASCADE"
    ))
    .execute(polling.pool())
    .await;
    s.cleanup().await;
}

/// host, user, database, port of the benchmark's URL (trust auth on loopback).
fn url_parts() -> (String, String, String, u16) {
    let url = pg_url();
    let rest = url.split("://").nth(1).unwrap_or("");
    let (auth, hostpath) = rest.split_once('@').unwrap_or(("postgres", rest));
    let user = auth.split(':').next().unwrap_or("postgres").to_owned();
    let (hostport, db) = hostpath.split_once('/').unwrap_or((hostpath, "postgres"));
    let db = db.split('?').next().unwrap_or("postgres").to_owned();
    let (host, port) = hostport.split_once(':').unwrap_or((hostport, "5432"));
    (host.to_owned(), user, db, port.parse().unwrap_or(5432))
}
