//! Whole histories (DESIGN.md, contract point 18): randomized runs of writers, relays and
//! faults on SQLite, PostgreSQL and MariaDB, recorded as they happen and checked as a whole.
//!
//! Writers commit, roll back, retry after deadlocks and use savepoints (released then rolled
//! back with their parent, rolled back alone, released and committed). Several relay
//! "processes" (each with its own store handle and publisher) publish while a chaos task
//! kills relays mid-batch (the task is dropped wherever it is, leaving its leases behind as a
//! SIGKILL would), takes the broker down, and the publishers refuse messages before sending
//! them (in ordered runs) or lose the acknowledgement of one they delivered. Then the checker
//! verifies, over everything recorded:
//! - committed ⇒ delivered at least once; rolled back or refused ⇒ never delivered;
//! - per ordering unit, first deliveries in commit order (consumers act on the first copy);
//! - every duplicate explained: the earlier copy's acknowledgement was lost, or the relay that
//!   delivered it was killed after delivering it.
//!
//! On a violation it prints the history around it. A short seeded run per store runs with the
//! tests; `OUTBOX_HISTORY_SEED`, `OUTBOX_HISTORY_RUNS` and `OUTBOX_HISTORY_SECS` make longer
//! ones (`scripts/soak.sh --history`).

use outbox::StoreAdmin;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox::conformance::{Hooked, RunningRelay};
use outbox::{
    async_trait, Envelope, Error, ErrorKind, KeepOrder, Message, Outbox, Publisher, Relay,
    RetryPolicy, Store,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

// ------------------------------------------------------------------ the record

/// One copy of a message the broker took.
#[derive(Debug, Clone)]
struct Delivery {
    by: String,
    tag: String,
    unit: Option<String>,
    /// The broker took it, but the publisher reported a failure (a lost acknowledgement).
    ack_lost: bool,
}

/// Everything that happened, in the order it happened.
#[derive(Default)]
struct Log {
    /// Per keep-order unit, its messages' tags in commit order: appended by a writer while it
    /// holds the unit's lock (after its enqueue, before its commit), so writers of a unit
    /// append in the order they commit.
    order: HashMap<String, Vec<String>>,
    committed: HashSet<String>,
    /// Rolled back, refused at enqueue, or in a transaction that failed.
    never: HashSet<String>,
    deliveries: Vec<Delivery>,
    /// (relay, deliveries recorded when it was killed)
    kills: Vec<(String, usize)>,
    /// Each relay's settles, in order: (relay, deliveries recorded when it started, whether
    /// it succeeded, whether it ended after the batch's lease).
    settles: Vec<(String, usize, bool, bool)>,
    /// Transactions that failed with a transient error (deadlocks, lock timeouts).
    transient_errors: usize,
    /// The same, in transactions that enqueued once (locks taken in one sorted call).
    single_call_transient_errors: usize,
    /// What those errors said (the first few).
    error_texts: Vec<String>,
    /// Of those, deadlocks (PostgreSQL 40P01, MySQL 1213).
    deadlocks: usize,
    savepoint_refusals: usize,
    refusals: usize,
    outages: usize,
}

type Shared = Arc<Mutex<Log>>;

// ------------------------------------------------------------------ the broker

/// What every publisher of a run shares: the record and the faults.
struct Broker {
    log: Shared,
    down: AtomicBool,
    rng: Mutex<StdRng>,
}

impl Broker {
    fn chance(&self, p: f64) -> bool {
        self.rng.lock().unwrap().gen_bool(p)
    }
}

/// A relay's (or the committer's) publisher. It pipelines a unit's run (`ordered_batches`)
/// and keeps that promise: a refusal before sending comes from `check_message`, and once a
/// message to a destination fails in a batch, no later one to it is delivered.
struct HistoryPublisher {
    by: String,
    broker: Arc<Broker>,
}

fn tag_of(env: &Envelope) -> String {
    String::from_utf8_lossy(&env.message.payload).into_owned()
}

fn unit_of(env: &Envelope) -> Option<String> {
    let m = &env.message;
    (m.stream == "ko").then(|| format!("ko/{}", m.key.as_deref().unwrap_or("")))
}

#[async_trait]
impl Publisher for HistoryPublisher {
    async fn publish(&self, env: &Envelope) -> outbox::Result<()> {
        outbox::single_result(self.publish_batch(&[env]).await)
    }

    fn ordered_batches(&self) -> bool {
        true
    }

    fn check_message(&self, _: &Envelope) -> outbox::Result<()> {
        if self.broker.down.load(Ordering::SeqCst) {
            return Err(Error::transient("broker down"));
        }
        if self.broker.chance(0.08) {
            self.broker.log.lock().unwrap().refusals += 1;
            return Err(Error::transient("refused before sending (injected)"));
        }
        Ok(())
    }

    async fn publish_batch(&self, batch: &[&Envelope]) -> Vec<outbox::Result<()>> {
        let mut failed: Vec<&str> = Vec::new();
        let mut out = Vec::with_capacity(batch.len());
        for env in batch {
            let destination = env.message.destination.as_str();
            if self.broker.down.load(Ordering::SeqCst) || failed.contains(&destination) {
                failed.push(destination);
                out.push(Err(Error::transient(
                    "broker down or an earlier message failed",
                )));
                continue;
            }
            let ack_lost = self.broker.chance(0.03);
            self.broker.log.lock().unwrap().deliveries.push(Delivery {
                by: self.by.clone(),
                tag: tag_of(env),
                unit: unit_of(env),
                ack_lost,
            });
            if ack_lost {
                failed.push(destination);
                out.push(Err(Error::transient("acknowledgement lost (injected)")));
            } else {
                out.push(Ok(()));
            }
        }
        out
    }
}

// ------------------------------------------------------------------ the stores

/// One transaction a writer runs.
struct Plan {
    outer: Vec<(String, Message)>,
    /// Messages enqueued in a savepoint, and whether it is released (else rolled back).
    savepoint: Option<(Vec<(String, Message)>, bool)>,
    commit: bool,
    /// How long the transaction stays open after its enqueues (the business logic after the
    /// enqueue, holding its unit locks).
    hold: Duration,
}

/// Called with the tags that commit if the commit succeeds, while their locks are held.
type Locked<'f> = dyn for<'a, 'b> Fn(&'a [&'b (String, Message)]) + Sync + 'f;

/// What became of a [`Plan`].
struct Outcome {
    /// The savepoint's enqueue was accepted (else refused, or none).
    savepoint_written: bool,
    /// `Some(true)`: committed; `Some(false)`: rolled back; `None`: the commit failed, so nobody
    /// knows.
    committed: Option<bool>,
    /// A failure before the end (the transaction was rolled back).
    error: Option<Error>,
}

#[async_trait]
trait Db: Send + Sync + 'static {
    type S: StoreAdmin + 'static;
    /// Whether its transactions have savepoints of the same type.
    const SAVEPOINTS: bool;
    fn store(&self) -> Arc<Self::S>;
    /// Another process's handle on the same table.
    async fn reopen(&self) -> Arc<Self::S>;
    /// Run `plan`; `locked` is called with the tags that commit if the commit succeeds, after
    /// the enqueues and before the commit.
    async fn transact(
        &self,
        outbox: &Outbox<Arc<Self::S>>,
        plan: &Plan,
        locked: &Locked<'_>,
    ) -> Outcome;
}

fn messages(part: &[(String, Message)]) -> Vec<Message> {
    part.iter().map(|(_, m)| m.clone()).collect()
}

/// The tags of `plan` that commit with it, given whether its savepoint was written.
fn survivors(plan: &Plan, savepoint_written: bool) -> Vec<&(String, Message)> {
    let mut out: Vec<&(String, Message)> = plan.outer.iter().collect();
    if let Some((part, true)) = &plan.savepoint {
        if savepoint_written {
            out.extend(part.iter());
        }
    }
    out
}

macro_rules! sqlx_db {
    ($name:ident, $module:ident, $store:ident, $options:ident, $env:literal, $default:literal) => {
        struct $name(Arc<outbox::$module::$store>);

        impl $name {
            async fn new() -> Self {
                use outbox::$module::{$options, $store};
                let url = std::env::var($env).unwrap_or_else(|_| $default.into());
                let table = format!("outbox_h{}", uuid::Uuid::now_v7().simple());
                let store = $store::connect_with(
                    &url,
                    $options {
                        table,
                        max_connections: 12,
                        acquire_timeout: Duration::from_secs(20),
                        ..Default::default()
                    },
                )
                .await
                .expect("the database must be reachable (scripts/setup.sh starts it)");
                store.migrate().await.unwrap();
                Self(Arc::new(store))
            }
        }

        #[async_trait]
        impl Db for $name {
            type S = outbox::$module::$store;
            const SAVEPOINTS: bool = true;

            fn store(&self) -> Arc<Self::S> {
                self.0.clone()
            }

            async fn reopen(&self) -> Arc<Self::S> {
                Arc::new(self.0.reopen().await.unwrap())
            }

            async fn transact(
                &self,
                outbox: &Outbox<Arc<Self::S>>,
                plan: &Plan,
                locked: &Locked<'_>,
            ) -> Outcome {
                use outbox::$module::sqlx::Connection;
                let failed = |e: Error| Outcome {
                    savepoint_written: false,
                    committed: Some(false),
                    error: Some(e),
                };
                let mut tx = match self.0.pool().begin().await {
                    Ok(tx) => tx,
                    Err(e) => return failed(outbox::$module::map_err(e)),
                };
                let mut after = match outbox.enqueue(&mut tx, messages(&plan.outer)).await {
                    Ok(after) => after,
                    Err(e) => return failed(e),
                };
                let mut savepoint_written = false;
                if let Some((part, release)) = &plan.savepoint {
                    let mut sp = match tx.begin().await {
                        Ok(sp) => sp,
                        Err(e) => return failed(outbox::$module::map_err(e)),
                    };
                    match outbox.enqueue(&mut sp, messages(part)).await {
                        Ok(more) => {
                            savepoint_written = true;
                            after.merge(more);
                        }
                        Err(e) if e.kind() == ErrorKind::Savepoint => {}
                        Err(e) => return failed(e),
                    }
                    let ended = if *release && savepoint_written {
                        sp.commit().await
                    } else {
                        sp.rollback().await
                    };
                    if let Err(e) = ended {
                        return failed(outbox::$module::map_err(e));
                    }
                }
                locked(&survivors(plan, savepoint_written));
                tokio::time::sleep(plan.hold).await;
                if plan.commit {
                    let committed = outbox::$module::commit(tx, after).await;
                    Outcome {
                        savepoint_written,
                        committed: committed.is_ok().then_some(true),
                        error: committed.err(),
                    }
                } else {
                    drop(after);
                    let _ = tx.rollback().await;
                    Outcome {
                        savepoint_written,
                        committed: Some(false),
                        error: None,
                    }
                }
            }
        }
    };
}

sqlx_db!(
    Postgres,
    postgres,
    PgStore,
    PgOptions,
    "OUTBOX_PG_URL",
    "postgres://postgres@127.0.0.1:5432/test"
);
sqlx_db!(
    MariaDb,
    mysql,
    MySqlStore,
    MySqlOptions,
    "OUTBOX_MYSQL_URL",
    "mysql://root@127.0.0.1:3306/test"
);

struct Sqlite {
    store: Arc<outbox::sqlite::SqliteStore>,
    _dir: tempfile::TempDir,
}

impl Sqlite {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = outbox::sqlite::SqliteStore::open(dir.path().join("h.db")).unwrap();
        store.migrate_now().unwrap();
        Self {
            store: Arc::new(store),
            _dir: dir,
        }
    }
}

#[async_trait]
impl Db for Sqlite {
    type S = outbox::sqlite::SqliteStore;
    /// rusqlite's savepoints have a type of their own, which `enqueue_blocking` does not take:
    /// the compiler refuses them.
    const SAVEPOINTS: bool = false;

    fn store(&self) -> Arc<Self::S> {
        self.store.clone()
    }

    async fn reopen(&self) -> Arc<Self::S> {
        Arc::new(self.store.reopen().unwrap())
    }

    async fn transact(
        &self,
        outbox: &Outbox<Arc<Self::S>>,
        plan: &Plan,
        locked: &Locked<'_>,
    ) -> Outcome {
        // rusqlite is synchronous: the whole transaction runs on this worker thread.
        tokio::task::block_in_place(|| {
            let failed = |e: Error| Outcome {
                savepoint_written: false,
                committed: Some(false),
                error: Some(e),
            };
            let mut conn = match self.store.connect() {
                Ok(c) => c,
                Err(e) => return failed(e),
            };
            let mut tx = match conn.transaction() {
                Ok(tx) => tx,
                Err(e) => return failed(outbox::sqlite::map_err(e)),
            };
            let after = match outbox.enqueue_blocking(&mut tx, messages(&plan.outer)) {
                Ok(after) => after,
                Err(e) => return failed(e),
            };
            locked(&survivors(plan, false));
            std::thread::sleep(plan.hold / 4); // SQLite: the whole database is held
            if !plan.commit {
                drop(after);
                let _ = tx.rollback();
                return Outcome {
                    savepoint_written: false,
                    committed: Some(false),
                    error: None,
                };
            }
            match tx.commit() {
                Ok(()) => {
                    after.dispatch();
                    Outcome {
                        savepoint_written: false,
                        committed: Some(true),
                        error: None,
                    }
                }
                Err(e) => Outcome {
                    savepoint_written: false,
                    committed: None,
                    error: Some(outbox::sqlite::map_err(e)),
                },
            }
        })
    }
}

// ------------------------------------------------------------------ the run

struct Settings {
    seed: u64,
    writers: usize,
    relays: usize,
    write_for: Duration,
}

fn settings(seed: u64) -> Settings {
    let secs = std::env::var("OUTBOX_HISTORY_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    Settings {
        seed,
        writers: 5,
        relays: 3,
        write_for: Duration::from_secs(secs),
    }
}

fn retry() -> RetryPolicy {
    RetryPolicy {
        initial: Duration::from_millis(10),
        max: Duration::from_millis(100),
        multiplier: 2.0,
        jitter: 0.5,
        max_attempts: 1_000_000,
    }
}

/// Keep-order units: enough that some drain, are forgotten and are made again by writers.
const UNITS: usize = 20;

/// A random transaction of writer `w`, its `n`th. A savepoint's units sort after the outer
/// part's (the README's rule for transactions that enqueue more than once: the same unit
/// order everywhere), so no two writers can deadlock on unit locks.
fn plan(rng: &mut StdRng, w: usize, n: usize, savepoints: bool) -> Plan {
    let mut i = 0;
    let mut part = |rng: &mut StdRng, count: usize, from: usize| -> Vec<(String, Message)> {
        (0..count)
            .map(|_| {
                i += 1;
                let tag = format!("w{w}.t{n}.m{i}");
                let m = if rng.gen_bool(0.7) {
                    let k = rng.gen_range(from..UNITS);
                    // Zero-padded: units lock in the order of their names.
                    Message::new(format!("unit.{k}"), tag.clone().into_bytes())
                        .stream("ko")
                        .key(format!("k{k:02}"))
                } else {
                    Message::new("oc", tag.clone().into_bytes()).stream("oc")
                };
                (tag, m)
            })
            .collect()
    };
    let count = rng.gen_range(1..=3);
    let outer = part(rng, count, 0);
    let last = outer
        .iter()
        .filter_map(|(_, m)| m.key.as_deref())
        .filter_map(|k| k[1..].parse::<usize>().ok())
        .max()
        .unwrap_or(0);
    let savepoint = (savepoints && rng.gen_bool(0.25)).then(|| {
        let count = rng.gen_range(1..=2);
        (part(rng, count, last), rng.gen_bool(0.6))
    });
    let hold = if rng.gen_bool(0.3) {
        Duration::from_millis(rng.gen_range(1..20))
    } else {
        Duration::ZERO
    };
    Plan {
        outer,
        savepoint,
        commit: rng.gen_bool(0.8),
        hold,
    }
}

async fn writer<D: Db>(
    db: Arc<D>,
    outbox: Outbox<Arc<D::S>>,
    log: Shared,
    w: usize,
    seed: u64,
    until: Instant,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut n = 0;
    while Instant::now() < until {
        n += 1;
        let plan = plan(&mut rng, w, n, D::SAVEPOINTS);
        let locked = |tags: &[&(String, Message)]| {
            let mut log = log.lock().unwrap();
            for (tag, m) in tags {
                if m.stream == "ko" {
                    let unit = format!("ko/{}", m.key.as_deref().unwrap_or(""));
                    log.order.entry(unit).or_default().push(tag.clone());
                }
            }
        };
        let outcome = db.transact(&outbox, &plan, &locked).await;
        let mut log = log.lock().unwrap();
        if let Some((part, _)) = &plan.savepoint {
            let refusable = part.iter().any(|(_, m)| m.stream == "oc");
            // Refused exactly when something would be published after the commit.
            if outcome.error.is_none() {
                assert_eq!(
                    !outcome.savepoint_written,
                    refusable,
                    "a savepoint's enqueue is refused exactly when it holds a publish-on-commit message"
                );
                if refusable {
                    log.savepoint_refusals += 1;
                }
            }
        }
        if let Some(e) = &outcome.error {
            if e.is_transient() {
                log.transient_errors += 1;
                let text = format!("{e:#}").to_lowercase();
                if text.contains("deadlock") {
                    log.deadlocks += 1;
                }
                if log.error_texts.len() < 5 {
                    let text = format!("{e:#}");
                    log.error_texts.push(text);
                }
                if plan.savepoint.is_none() {
                    log.single_call_transient_errors += 1;
                }
            } else {
                panic!("writer {w}: a permanent error: {e}");
            }
        }
        let kept: HashSet<&str> = survivors(&plan, outcome.savepoint_written)
            .into_iter()
            .map(|(t, _)| t.as_str())
            .collect();
        let everything = plan
            .outer
            .iter()
            .chain(plan.savepoint.iter().flat_map(|(p, _)| p.iter()));
        for (tag, _) in everything {
            match outcome.committed {
                Some(true) if kept.contains(tag.as_str()) => log.committed.insert(tag.clone()),
                Some(_) => log.never.insert(tag.clone()),
                None => false, // unknown: not checked
            };
        }
    }
}

/// A relay process of the run: its id (the publisher's name) and the running relay.
struct RelayTask {
    id: String,
    running: RunningRelay,
}

/// Leases of the relays: a killed relay's batch is published again this long after its claim.
const LEASE: Duration = Duration::from_secs(4);

async fn start_relay<D: Db>(db: &D, broker: &Arc<Broker>, id: String) -> RelayTask {
    let publisher = HistoryPublisher {
        by: id.clone(),
        broker: broker.clone(),
    };
    // Its settles are recorded: when one starts (how many deliveries the broker had then),
    // whether it succeeded, and whether it ended after the lease of the batch it records (its
    // claim's start plus the lease), which lets the batch be claimed and published again: a
    // duplicate the contract allows (a relay that timed out).
    let claimed = Arc::new(Mutex::new(Instant::now()));
    let started = Arc::new(AtomicUsize::new(0));
    let (c1, c2, s1, s2) = (claimed.clone(), claimed, started.clone(), started);
    let (log1, log2, by) = (broker.log.clone(), broker.log.clone(), id.clone());
    let store = Hooked::new(db.reopen().await)
        .on_claim(move || *c1.lock().unwrap() = Instant::now())
        .before_settle(move || {
            s1.store(log1.lock().unwrap().deliveries.len(), Ordering::SeqCst);
            None
        })
        .after_settle(move |result| {
            let late = c2.lock().unwrap().elapsed() >= LEASE;
            let at = s2.load(Ordering::SeqCst);
            let mut log = log2.lock().unwrap();
            log.settles.push((by.clone(), at, result.is_ok(), late));
        });
    let relay = Relay::builder(store, publisher)
        .batch_size(20)
        .lease(LEASE)
        .publish_timeout(Duration::from_secs(1))
        .poll_interval(Duration::from_millis(50))
        .retry(retry())
        .build()
        .unwrap();
    RelayTask {
        id,
        running: RunningRelay::spawn(relay),
    }
}

/// One whole run on `db`; panics with the history around the first violation.
async fn run<D: Db>(db: D, s: Settings) {
    let db = Arc::new(db);
    let log: Shared = Arc::default();
    let broker = Arc::new(Broker {
        log: log.clone(),
        down: AtomicBool::new(false),
        rng: Mutex::new(StdRng::seed_from_u64(s.seed ^ 0xb40c)),
    });
    let outbox = Outbox::builder(
        db.store(),
        HistoryPublisher {
            by: "committer".into(),
            broker: broker.clone(),
        },
    )
    .stream_strategy("ko", KeepOrder::default())
    .retry(retry())
    .build()
    .unwrap();
    let started = Instant::now();
    let until = started + s.write_for;
    let mut relays = Vec::new();
    let next_relay = AtomicUsize::new(0);
    let new_id = || format!("r{}", next_relay.fetch_add(1, Ordering::SeqCst));
    for _ in 0..s.relays {
        relays.push(start_relay(db.as_ref(), &broker, new_id()).await);
    }
    let writers: Vec<_> = (0..s.writers)
        .map(|w| {
            tokio::spawn(writer(
                db.clone(),
                outbox.clone(),
                log.clone(),
                w,
                s.seed.wrapping_mul(31).wrapping_add(w as u64),
                until,
            ))
        })
        .collect();
    // Chaos while the writers write.
    let mut chaos = StdRng::seed_from_u64(s.seed ^ 0xc4a05);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(chaos.gen_range(150..600))).await;
        let roll: f64 = chaos.gen();
        if roll < 0.3 {
            let victim = relays.swap_remove(chaos.gen_range(0..relays.len()));
            victim.running.kill().await;
            {
                let mut log = log.lock().unwrap();
                let at = log.deliveries.len();
                log.kills.push((victim.id.clone(), at));
            }
            relays.push(start_relay(db.as_ref(), &broker, new_id()).await);
        } else if roll < 0.45 {
            broker.down.store(true, Ordering::SeqCst);
            log.lock().unwrap().outages += 1;
            tokio::time::sleep(Duration::from_millis(chaos.gen_range(100..400))).await;
            broker.down.store(false, Ordering::SeqCst);
        }
    }
    for w in writers {
        w.await.expect("a writer panicked");
    }
    broker.down.store(false, Ordering::SeqCst);
    // Drain: every committed message delivered (leases of killed relays end after 3 s).
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let missing = {
            let log = log.lock().unwrap();
            let delivered: HashSet<&str> = log.deliveries.iter().map(|d| d.tag.as_str()).collect();
            log.committed
                .iter()
                .filter(|t| !delivered.contains(t.as_str()))
                .count()
        };
        if missing == 0 {
            break;
        }
        if Instant::now() > deadline {
            let stats = db.store().stats().await.map(|s| s.total());
            panic!(
                "seed {}: {missing} committed messages not delivered after 90 s of draining: {stats:?}",
                s.seed
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    outbox.shutdown(Duration::from_secs(10)).await.unwrap();
    for r in relays {
        r.running.stop().await;
    }
    let log = log.lock().unwrap();
    check(&log, s.seed);
    assert_eq!(
        log.deadlocks, 0,
        "seed {}: writers that take unit locks in one order must never deadlock: {:?}",
        s.seed, log.error_texts
    );
    eprintln!(
        "history seed {}: {} committed, {} never, {} deliveries, {} duplicates, {} kills, {} late or failed settles, {} outages, {} refusals, {} savepoint refusals, {} transient writer errors ({} in single-enqueue transactions), {:.1} s",
        s.seed,
        log.committed.len(),
        log.never.len(),
        log.deliveries.len(),
        log.deliveries.len() - log.deliveries.iter().map(|d| &d.tag).collect::<HashSet<_>>().len(),
        log.kills.len(),
        log.settles.iter().filter(|s| !s.2 || s.3).count(),
        log.outages,
        log.refusals,
        log.savepoint_refusals,
        log.transient_errors,
        log.single_call_transient_errors,
        started.elapsed().as_secs_f64()
    );
    for text in &log.error_texts {
        eprintln!("  writer error: {text}");
    }
}

/// The contract over the whole record.
fn check(log: &Log, seed: u64) {
    let fail = |what: String, unit: Option<&str>| -> ! {
        let mut context = String::new();
        if let Some(unit) = unit {
            let order = log.order.get(unit).cloned().unwrap_or_default();
            context += &format!("\ncommit order of {unit}: {order:?}\ndeliveries of {unit}:\n");
            for (i, d) in log.deliveries.iter().enumerate() {
                if d.unit.as_deref() == Some(unit) {
                    context += &format!(
                        "  #{i} {} by {}{}\n",
                        d.tag,
                        d.by,
                        if d.ack_lost { " (ack lost)" } else { "" }
                    );
                }
            }
        }
        context += &format!("kills (relay, after delivery #): {:?}", log.kills);
        panic!("seed {seed}: {what}{context}");
    };
    // Rolled back ⇒ never delivered; committed ⇒ delivered.
    let mut copies: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, d) in log.deliveries.iter().enumerate() {
        copies.entry(d.tag.as_str()).or_default().push(i);
        if log.never.contains(&d.tag) {
            fail(
                format!("{} was rolled back or refused, and delivered (#{i})", d.tag),
                d.unit.as_deref(),
            );
        }
    }
    for tag in &log.committed {
        if !copies.contains_key(tag.as_str()) {
            fail(format!("{tag} was committed and never delivered"), None);
        }
    }
    // Every duplicate explained: the earlier copy's acknowledgement was lost, its relay was
    // killed after delivering it, or the settle that recorded its batch failed or ended after
    // the lease (a relay that timed out).
    for (tag, at) in &copies {
        for pair in at.windows(2) {
            let earlier = &log.deliveries[pair[0]];
            let killed = log
                .kills
                .iter()
                .any(|(relay, after)| *relay == earlier.by && *after > pair[0]);
            // The settle that recorded the copy's batch: the relay's first successful one after
            // it (failed tries before it were retried); none means the relay gave up.
            let timed_out = log
                .settles
                .iter()
                .find(|(relay, started, ok, _)| *relay == earlier.by && *started > pair[0] && *ok)
                .is_none_or(|(_, _, _, late)| *late);
            if !(earlier.ack_lost || killed || timed_out) {
                fail(
                    format!(
                        "{tag} delivered again (#{}) with no lost acknowledgement, no kill of {} after its copy #{} and no late or failed settle of it",
                        pair[1], earlier.by, pair[0]
                    ),
                    earlier.unit.as_deref(),
                );
            }
        }
    }
    // Per unit, first deliveries in commit order.
    let mut first_seen: HashSet<&str> = HashSet::new();
    let mut last_index: HashMap<&str, (usize, &str)> = HashMap::new();
    let position: HashMap<&str, HashMap<&str, usize>> = log
        .order
        .iter()
        .map(|(u, tags)| {
            (
                u.as_str(),
                tags.iter()
                    .enumerate()
                    .map(|(i, t)| (t.as_str(), i))
                    .collect(),
            )
        })
        .collect();
    for d in &log.deliveries {
        let Some(unit) = d.unit.as_deref() else {
            continue;
        };
        if !first_seen.insert(d.tag.as_str()) {
            continue;
        }
        let Some(&pos) = position.get(unit).and_then(|p| p.get(d.tag.as_str())) else {
            fail(
                format!("{} delivered but not in {unit}'s commit order", d.tag),
                Some(unit),
            );
        };
        if let Some(&(prev, prev_tag)) = last_index.get(unit) {
            if pos < prev {
                fail(
                    format!(
                        "{} (commit position {pos}) first delivered after {prev_tag} (position {prev})",
                        d.tag
                    ),
                    Some(unit),
                );
            }
        }
        last_index.insert(unit, (pos, d.tag.as_str()));
    }
}

fn seeds() -> Vec<u64> {
    let first = std::env::var("OUTBOX_HISTORY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_261_206);
    let runs = std::env::var("OUTBOX_HISTORY_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1u64);
    (0..runs).map(|i| first + i).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whole_histories_on_sqlite() {
    for seed in seeds() {
        run(Sqlite::new(), settings(seed)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whole_histories_on_postgres() {
    for seed in seeds() {
        run(Postgres::new().await, settings(seed)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whole_histories_on_mariadb() {
    for seed in seeds() {
        run(MariaDb::new().await, settings(seed)).await;
    }
}
