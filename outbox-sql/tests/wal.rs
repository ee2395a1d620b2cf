//! The WAL relay against a real PostgreSQL cluster of the test's own with
//! `wal_level = logical` (`pg_createcluster` on a free port): the delivery contract (atomic
//! enqueue, savepoints, order of first deliveries with several writers at once), a relay
//! killed mid-stream, a standby taking the slot over, PostgreSQL restarted under the relay,
//! refusals in a keep-order unit (park, resume, dead letters), undecodable messages and a
//! transaction of 100 000 messages.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use outbox_core::conformance::eventually;
use outbox_core::{
    Envelope, Error, FaultyPublisher, KeepOrder, Message, MessageId, Outbox, RecordingPublisher,
    RetryPolicy, StoreAdmin,
};
use outbox_sql::postgres::sqlx::{self, Connection};
use outbox_sql::postgres::wal::{slot_lag, WalRelay, WalStore};
use outbox_sql::postgres::{map_err, PgStore};
use outbox_testkit::PgCluster;

struct Wal {
    cluster: PgCluster,
    store: WalStore,
    outbox: Outbox<WalStore>,
}

const SLOT: &str = "outbox_slot";
const PUBLICATION: &str = "outbox_pub";

/// How the writers hand messages to the WAL.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// `pg_logical_emit_message` (no row).
    Messages,
    /// Rows of `<table>_wal` (table mode).
    Rows,
}

/// `$messages` runs `$body` with logical messages, `$rows` in table mode.
macro_rules! in_both_modes {
    ($messages:ident, $rows:ident, $body:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $messages() {
            $body(Mode::Messages).await
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $rows() {
            $body(Mode::Rows).await
        }
    };
}

async fn wal(strategy: KeepOrder) -> Wal {
    wal_in(Mode::Messages, strategy).await
}

async fn wal_in(mode: Mode, strategy: KeepOrder) -> Wal {
    let cluster = PgCluster::create(&[
        "wal_level=logical",
        "max_wal_senders=10",
        "max_replication_slots=10",
    ]);
    let table = PgStore::connect(&cluster.url()).await.unwrap();
    let store = match mode {
        Mode::Messages => WalStore::new(table, "outbox").unwrap(),
        Mode::Rows => WalStore::rows(table),
    };
    store.setup(SLOT, PUBLICATION).await.unwrap();
    // Idempotent.
    store.setup(SLOT, PUBLICATION).await.unwrap();
    let outbox = Outbox::writer(store.clone())
        .strategy(strategy)
        .build()
        .unwrap();
    Wal {
        cluster,
        store,
        outbox,
    }
}

fn fast_retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        initial: Duration::from_millis(10),
        max: Duration::from_millis(50),
        multiplier: 2.0,
        jitter: 0.0,
        max_attempts,
    }
}

fn relay(w: &Wal, publisher: impl outbox_core::Publisher + 'static) -> WalRelay {
    WalRelay::builder(&w.cluster.url(), w.store.clone(), publisher)
        .slot(SLOT)
        .publication(PUBLICATION)
        .retry(fast_retry(3))
        .memory_attempts(2)
        .status_interval(Duration::from_millis(100))
        .standby_interval(Duration::from_millis(100))
        .build()
        .unwrap()
}

/// Run `relay` in a task until the returned sender fires (or the task is aborted: a crash).
fn spawn(
    relay: WalRelay,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<(outbox_core::Result<()>, WalRelay)>,
) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let r = relay
            .run(async {
                let _ = rx.await;
            })
            .await;
        (r, relay)
    });
    (tx, task)
}

async fn commit(w: &Wal, messages: Vec<Message>) {
    let mut tx = w.store.table().pool().begin().await.unwrap();
    let _ = w.outbox.enqueue(&mut tx, messages).await.unwrap();
    tx.commit().await.unwrap();
}

fn text(e: &Envelope) -> String {
    String::from_utf8_lossy(&e.message.payload).into_owned()
}

/// First deliveries per key, in delivery order (a consumer acts on the first copy).
fn first_deliveries(published: &[Envelope]) -> HashMap<String, Vec<String>> {
    let mut seen = HashSet::new();
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for e in published {
        if seen.insert(e.id) {
            out.entry(e.message.key.clone().unwrap_or_default())
                .or_default()
                .push(text(e));
        }
    }
    out
}

// Several writers at once (half of them committing with `commit_with`), with rolled-back
// transactions, savepoints rolled back inside committed transactions and savepoints released
// inside rolled-back ones: exactly the
// committed messages are published, once each, in commit order per key, while the relay
// streams; and the slot's position is confirmed as it goes.
in_both_modes!(
    committed_messages_only_once_each_in_commit_order_with_concurrent_writers,
    committed_messages_only_once_each_in_commit_order_with_concurrent_writers_table_mode,
    committed_messages_only_once_each_in_commit_order_with_concurrent_writers_in
);

async fn committed_messages_only_once_each_in_commit_order_with_concurrent_writers_in(mode: Mode) {
    let w = Arc::new(wal_in(mode, KeepOrder::default()).await);
    let broker = RecordingPublisher::new();
    let (stop, task) = spawn(relay(&w, broker.clone()));
    let mut writers = Vec::new();
    for writer in 0..4 {
        let w = w.clone();
        writers.push(tokio::spawn(async move {
            let mut committed = Vec::new();
            for i in 0..150 {
                let key = format!("w{writer}-k{}", i % 5);
                let msg = |tag: &str| {
                    Message::new("orders", format!("{key}/{i}/{tag}"))
                        .stream("s")
                        .key(key.clone())
                };
                let pool = w.store.table().pool();
                let mut tx = pool.begin().await.unwrap();
                let _ = w.outbox.enqueue(&mut tx, [msg("a")]).await.unwrap();
                if i % 7 == 0 {
                    // A savepoint rolled back inside a committed transaction.
                    let mut sp = tx.begin().await.unwrap();
                    let _ = w
                        .outbox
                        .enqueue(&mut sp, [msg("rolled-back-savepoint")])
                        .await
                        .unwrap();
                    sp.rollback().await.unwrap();
                }
                if i % 11 == 0 {
                    // A savepoint released, then its parent rolled back.
                    let mut sp = tx.begin().await.unwrap();
                    let _ = w
                        .outbox
                        .enqueue(&mut sp, [msg("released-then-parent-rolled-back")])
                        .await
                        .unwrap();
                    sp.commit().await.unwrap();
                    tx.rollback().await.unwrap();
                    continue;
                }
                if i % 5 == 3 {
                    tx.rollback().await.unwrap();
                    continue;
                }
                if writer % 2 == 0 {
                    let _ = w.outbox.enqueue(&mut tx, [msg("b")]).await.unwrap();
                    tx.commit().await.unwrap();
                } else {
                    // Half the writers send their last message with the COMMIT.
                    outbox_sql::postgres::wal::commit_with(tx, &w.outbox, [msg("b")])
                        .await
                        .unwrap();
                }
                committed.push(format!("{key}/{i}/a"));
                committed.push(format!("{key}/{i}/b"));
            }
            committed
        }));
    }
    let mut expected: HashMap<String, Vec<String>> = HashMap::new();
    let mut total = 0;
    for writer in writers {
        for m in writer.await.unwrap() {
            total += 1;
            let key = m.split('/').next().unwrap().to_owned();
            expected.entry(key).or_default().push(m);
        }
    }
    eventually(
        "every committed message published",
        Duration::from_secs(60),
        || async { broker.count() >= total },
    )
    .await;
    // Nothing more arrives: rolled-back work never does.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let published = broker.published();
    assert_eq!(
        published.len(),
        total,
        "a message published twice or a rolled-back one published"
    );
    assert!(published.iter().all(|e| !text(e).contains("rolled-back")));
    assert_eq!(first_deliveries(&published), expected);
    // The slot is confirmed as the relay goes (it keeps little WAL).
    let pool = w.store.table().pool().clone();
    eventually(
        "the slot's position confirmed",
        Duration::from_secs(10),
        || async {
            let lag = slot_lag(&pool, SLOT).await.unwrap().unwrap();
            lag.active && lag.retained_bytes < 64 * 1024
        },
    )
    .await;
    if let Mode::Rows = mode {
        // Table mode: the relay deleted the rows it published.
        let pool = w.store.table().pool().clone();
        let count = format!("SELECT count(*) FROM {}", w.store.wal_table());
        eventually(
            "published rows deleted",
            Duration::from_secs(10),
            || async {
                sqlx::query_scalar::<_, i64>(&count)
                    .fetch_one(&pool)
                    .await
                    .unwrap()
                    == 0
            },
        )
        .await;
    }
    stop.send(()).unwrap();
    let (result, first) = task.await.unwrap();
    result.unwrap();
    assert_eq!(first.stats().published as usize, total);
    // The table holds nothing: no row was written on the way.
    assert_eq!(w.store.stats().await.unwrap().total().pending, 0);
}

// A relay killed mid-stream (its task aborted while batches are at the broker) and a
// standby that was waiting for the slot: the standby takes over, nothing committed is
// lost, and first deliveries stay in commit order per key; duplicates stay within the
// unconfirmed window.
in_both_modes!(
    a_standby_takes_the_slot_over_from_a_killed_relay_losing_nothing,
    a_standby_takes_the_slot_over_from_a_killed_relay_losing_nothing_table_mode,
    a_standby_takes_the_slot_over_from_a_killed_relay_losing_nothing_in
);

async fn a_standby_takes_the_slot_over_from_a_killed_relay_losing_nothing_in(mode: Mode) {
    let w = wal_in(mode, KeepOrder::default()).await;
    let broker = RecordingPublisher::new();
    // A publisher slow enough that the kill lands mid-stream.
    let slow = FaultyPublisher::new(broker.clone(), |_| {
        std::thread::sleep(Duration::from_micros(200));
        None
    });
    let (_stop_a, a) = spawn(relay(&w, slow.clone()));
    let mut a = Some(a);
    eventually("relay A streaming", Duration::from_secs(20), || async {
        slot_lag(w.store.table().pool(), SLOT)
            .await
            .unwrap()
            .unwrap()
            .active
    })
    .await;
    let standby = relay(&w, slow.clone());
    let (stop_b, b) = spawn(standby);
    let mut expected: HashMap<String, Vec<String>> = HashMap::new();
    for t in 0..300 {
        let msgs: Vec<Message> = (0..10)
            .map(|j| {
                let key = format!("k{}", (t * 10 + j) % 20);
                let body = format!("{key}/{t}/{j}");
                expected.entry(key.clone()).or_default().push(body.clone());
                Message::new("orders", body).stream("s").key(key)
            })
            .collect();
        commit(&w, msgs).await;
        if t == 150 {
            eventually(
                "relay A published some",
                Duration::from_secs(20),
                || async { broker.count() > 200 },
            )
            .await;
            let a = a.take().unwrap();
            a.abort();
            let _ = a.await;
        }
    }
    eventually(
        "the standby delivered everything",
        Duration::from_secs(60),
        || async {
            first_deliveries(&broker.published())
                .values()
                .map(Vec::len)
                .sum::<usize>()
                == 3000
        },
    )
    .await;
    let published = broker.published();
    assert_eq!(first_deliveries(&published), expected);
    assert!(
        published.len() - 3000 <= 10_000 + 100,
        "duplicates beyond one unconfirmed window"
    );
    stop_b.send(()).unwrap();
    let (result, b) = b.await.unwrap();
    result.unwrap();
    assert_eq!(b.stats().sessions, 1, "the standby took over once");
}

/// PostgreSQL restarted under a streaming relay: it reconnects and publishes everything
/// committed before and after, first deliveries in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_under_the_relay_loses_nothing() {
    let w = wal(KeepOrder::default()).await;
    let broker = RecordingPublisher::new();
    let (stop, task) = spawn(relay(&w, broker.clone()));
    let mut expected: HashMap<String, Vec<String>> = HashMap::new();
    for t in 0..200 {
        if t == 100 {
            w.cluster.restart();
        }
        let key = format!("k{}", t % 7);
        let body = format!("{key}/{t}");
        // The pool's connections died with the server: retry the commit.
        loop {
            let attempt = async {
                let mut tx = w.store.table().pool().begin().await.map_err(map_err)?;
                let _ = w
                    .outbox
                    .enqueue(
                        &mut tx,
                        [Message::new("o", body.clone()).stream("s").key(key.clone())],
                    )
                    .await?;
                tx.commit().await.map_err(map_err)
            };
            match attempt.await {
                Ok(()) => break,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        expected.entry(key).or_default().push(body);
    }
    eventually(
        "everything delivered after the restart",
        Duration::from_secs(60),
        || async {
            first_deliveries(&broker.published())
                .values()
                .map(Vec::len)
                .sum::<usize>()
                == 200
        },
    )
    .await;
    assert_eq!(first_deliveries(&broker.published()), expected);
    stop.send(()).unwrap();
    let (result, relay) = task.await.unwrap();
    result.unwrap();
    assert!(relay.stats().sessions >= 2, "the relay reconnected");
}

// A message the broker keeps refusing in a keep-order unit whose policy parks: its unit
// moves to the table (the refused head, then its later messages, in order) and is parked;
// other units keep flowing from the WAL and the slot keeps being confirmed. Resumed once
// the broker takes it, the unit's messages come out in order, and later ones flow from
// the WAL again, after them.
in_both_modes!(
    a_refused_keep_order_message_parks_its_unit_only_and_resumes_in_order,
    a_refused_keep_order_message_parks_its_unit_only_and_resumes_in_order_table_mode,
    a_refused_keep_order_message_parks_its_unit_only_and_resumes_in_order_in
);

async fn a_refused_keep_order_message_parks_its_unit_only_and_resumes_in_order_in(mode: Mode) {
    let w = wal_in(mode, KeepOrder::park()).await;
    let broker = RecordingPublisher::new();
    let refuse = Arc::new(AtomicBool::new(true));
    let r2 = refuse.clone();
    let faulty = FaultyPublisher::new(broker.clone(), move |e| {
        (r2.load(Ordering::SeqCst) && text(e) == "a/2").then(|| Error::transient("broker says no"))
    });
    let (stop, task) = spawn(relay(&w, faulty));
    let a = |i: usize| Message::new("o", format!("a/{i}")).stream("s").key("a");
    let b = |i: usize| Message::new("o", format!("b/{i}")).stream("s").key("b");
    commit(&w, vec![a(1), a(2), a(3)]).await;
    commit(&w, vec![a(4), b(1)]).await;
    for i in 2..=50 {
        commit(&w, vec![b(i)]).await;
    }
    eventually("unit a parked", Duration::from_secs(30), || async {
        !w.store.parked_units(None, 10).await.unwrap().is_empty()
    })
    .await;
    eventually("unit b flowed past it", Duration::from_secs(30), || async {
        first_deliveries(&broker.published()).get("b").map(Vec::len) == Some(50)
    })
    .await;
    let parked = w.store.parked_units(None, 10).await.unwrap();
    assert_eq!(
        (parked[0].stream.as_str(), parked[0].unit.as_str()),
        ("s", "a")
    );
    assert_eq!(first_deliveries(&broker.published())["a"], vec!["a/1"]);
    // The slot is confirmed past the refused message: the stream did not stop.
    let pool = w.store.table().pool().clone();
    eventually(
        "the slot confirmed past the refusal",
        Duration::from_secs(10),
        || async { slot_lag(&pool, SLOT).await.unwrap().unwrap().retained_bytes < 64 * 1024 },
    )
    .await;
    // Written while parked: behind the unit, in the table.
    commit(&w, vec![a(5)]).await;
    refuse.store(false, Ordering::SeqCst);
    w.store.resume_unit("s", "a").await.unwrap();
    eventually(
        "unit a drained after resume",
        Duration::from_secs(30),
        || async { first_deliveries(&broker.published()).get("a").map(Vec::len) == Some(5) },
    )
    .await;
    // Later messages flow from the WAL again, after the table's.
    commit(&w, vec![a(6)]).await;
    eventually("a/6 delivered", Duration::from_secs(30), || async {
        first_deliveries(&broker.published()).get("a").map(Vec::len) == Some(6)
    })
    .await;
    let firsts = first_deliveries(&broker.published());
    assert_eq!(
        firsts["a"],
        (1..=6).map(|i| format!("a/{i}")).collect::<Vec<_>>()
    );
    assert_eq!(
        firsts["b"],
        (1..=50).map(|i| format!("b/{i}")).collect::<Vec<_>>()
    );
    stop.send(()).unwrap();
    let (result, relay) = task.await.unwrap();
    result.unwrap();
    let stats = relay.stats();
    assert!(
        stats.aside >= 3,
        "a/2, a/3, a/4 went to the table: {stats:?}"
    );
}

/// A permanent refusal under a dead-letter policy: the message is a dead letter in the
/// table, its unit moves on from the WAL in order; a logical message with the outbox prefix
/// that does not decode is a dead letter with its reason, and the stream goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_and_undecodable_messages_are_dead_letters_and_the_stream_goes_on() {
    let w = wal(KeepOrder::dead_letter()).await;
    let broker = RecordingPublisher::new();
    let faulty = FaultyPublisher::new(broker.clone(), |e| {
        (text(e) == "a/2").then(|| Error::permanent("schema registry says no"))
    });
    let (stop, task) = spawn(relay(&w, faulty));
    let a = |i: usize| Message::new("o", format!("a/{i}")).stream("s").key("a");
    commit(&w, vec![a(1), a(2), a(3)]).await;
    let mut tx = w.store.table().pool().begin().await.unwrap();
    sqlx::query("SELECT pg_logical_emit_message(true, 'outbox', '\\x00ff'::bytea)")
        .execute(&mut *tx)
        .await
        .unwrap();
    // A message that counts whole or not at all: its first record is sound, its second cut
    // short. The first must not be published on its own.
    sqlx::query("SELECT pg_logical_emit_message(true, 'outbox', $1::bytea)")
        .bind(half_sound_message())
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    commit(&w, vec![a(4)]).await;
    eventually("a/4 delivered", Duration::from_secs(30), || async {
        first_deliveries(&broker.published()).get("a").map(Vec::len) == Some(3)
    })
    .await;
    assert_eq!(
        first_deliveries(&broker.published())["a"],
        vec!["a/1", "a/3", "a/4"]
    );
    // A round publishes, then writes aside: the dead letters may land just after a/4.
    eventually("three dead letters", Duration::from_secs(10), || async {
        w.store.dead_letters(None, 10).await.unwrap().len() == 3
    })
    .await;
    let dead = w.store.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 3, "{dead:?}");
    assert!(
        !broker.published().iter().any(|e| text(e) == "b/1"),
        "the sound half of a broken message was published"
    );
    let reasons: Vec<String> = dead.iter().filter_map(|d| d.last_error.clone()).collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("schema registry says no")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("undecodable")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("record 1: truncated")),
        "{reasons:?}"
    );
    assert!(dead.iter().any(|d| d.envelope.message.payload == b"a/2"));
    stop.send(()).unwrap();
    task.await.unwrap().0.unwrap();
}

/// `commit_with`: the messages ride with the COMMIT. They commit with the transaction's own
/// writes or not at all (a COMMIT that fails, a savepoint refused), byte for byte (quotes,
/// backslashes, NUL), in commit order with `enqueue`d ones, and the pool's only connection
/// is clean for the next transaction after each outcome.
async fn commit_with_rides_the_commit(mode: Mode) {
    let w = wal_in(mode, KeepOrder::default()).await;
    let url = w.cluster.url();
    let one = PgStore::connect_with(
        &url,
        outbox_sql::postgres::PgOptions {
            table: w.store.table().table().to_owned(),
            max_connections: 1,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let store = match mode {
        Mode::Messages => WalStore::new(one.clone(), "outbox").unwrap(),
        Mode::Rows => WalStore::rows(one.clone()),
    };
    let writer = Outbox::writer(store)
        .strategy(KeepOrder::default())
        .build()
        .unwrap();
    sqlx::query("CREATE TABLE biz (id TEXT PRIMARY KEY DEFERRABLE INITIALLY DEFERRED)")
        .execute(one.pool())
        .await
        .unwrap();
    let broker = RecordingPublisher::new();
    let (stop, task) = spawn(relay(&w, broker.clone()));
    let m = |body: &[u8]| Message::new("o", body.to_vec()).stream("s").key("k");
    let odd: &[u8] = b"it's \\x00 '); DROP TABLE biz; --\0\xff";

    let mut tx = one.pool().begin().await.unwrap();
    sqlx::query("INSERT INTO biz VALUES ('a')")
        .execute(&mut *tx)
        .await
        .unwrap();
    outbox_sql::postgres::wal::commit_with(tx, &writer, vec![m(b"1"), m(odd)])
        .await
        .unwrap();
    // The COMMIT fails (a deferred key check): neither the row nor the message commits.
    let mut tx = one.pool().begin().await.unwrap();
    sqlx::query("INSERT INTO biz VALUES ('a')")
        .execute(&mut *tx)
        .await
        .unwrap();
    let failed = outbox_sql::postgres::wal::commit_with(tx, &writer, vec![m(b"never")]).await;
    assert!(failed.is_err(), "{failed:?}");
    // In a savepoint: refused, nothing written, the outer transaction goes on.
    let mut tx = one.pool().begin().await.unwrap();
    sqlx::query("INSERT INTO biz VALUES ('b')")
        .execute(&mut *tx)
        .await
        .unwrap();
    let savepoint = tx.begin().await.unwrap();
    let e = outbox_sql::postgres::wal::commit_with(savepoint, &writer, vec![m(b"never 2")])
        .await
        .unwrap_err();
    assert_eq!(e.kind(), outbox_core::ErrorKind::Savepoint, "{e}");
    let _ = writer.enqueue(&mut tx, vec![m(b"2")]).await.unwrap();
    tx.commit().await.unwrap();
    let mut tx = one.pool().begin().await.unwrap();
    sqlx::query("INSERT INTO biz VALUES ('c')")
        .execute(&mut *tx)
        .await
        .unwrap();
    outbox_sql::postgres::wal::commit_with(tx, &writer, vec![m(b"3")])
        .await
        .unwrap();

    eventually(
        "the four committed messages",
        Duration::from_secs(30),
        || async { first_deliveries(&broker.published()).get("k").map(Vec::len) == Some(4) },
    )
    .await;
    let published = broker.published();
    let bodies: Vec<&[u8]> = published.iter().map(|e| &e.message.payload[..]).collect();
    assert_eq!(
        bodies,
        [b"1" as &[u8], odd, b"2", b"3"],
        "in commit order, byte for byte"
    );
    let rows: Vec<String> = sqlx::query_scalar("SELECT id FROM biz ORDER BY id")
        .fetch_all(one.pool())
        .await
        .unwrap();
    assert_eq!(rows, ["a", "b", "c"]);
    // The pool's connection is left in no transaction (not "idle in transaction").
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(one.pool())
        .await
        .unwrap();
    eventually(
        "the connection idle, in no transaction",
        Duration::from_secs(10),
        || async {
            let state: Option<String> =
                sqlx::query_scalar("SELECT state FROM pg_stat_activity WHERE pid = $1")
                    .bind(pid)
                    .fetch_one(w.store.table().pool())
                    .await
                    .unwrap();
            state.as_deref() == Some("idle")
        },
    )
    .await;
    stop.send(()).unwrap();
    task.await.unwrap().0.unwrap();
}

in_both_modes!(
    commit_with_rides_the_commit_with_messages,
    commit_with_rides_the_commit_with_rows,
    commit_with_rides_the_commit
);

/// A table-less message in the writer's format (see `record.rs`) claiming two records: the
/// first whole (payload "b/1", unit "b", keep-order), the second cut after its id.
fn half_sound_message() -> Vec<u8> {
    fn put(out: &mut Vec<u8>, b: &[u8]) {
        out.extend_from_slice(&(b.len() as u32).to_be_bytes());
        out.extend_from_slice(b);
    }
    let mut m = b"OBX1".to_vec();
    m.extend_from_slice(&2u32.to_be_bytes());
    put(&mut m, MessageId::new().to_string().as_bytes());
    m.extend_from_slice(&1_700_000_000_000i64.to_be_bytes());
    m.extend_from_slice(&[1, 0]); // in its unit, default exhaustion
    for s in ["b", "s", "o"] {
        put(&mut m, s.as_bytes()); // unit, stream, destination
    }
    m.push(0); // no key
    put(&mut m, b"application/octet-stream");
    m.extend_from_slice(&0u32.to_be_bytes()); // no headers
    put(&mut m, b"b/1");
    m.push(0); // no signature
    m.extend_from_slice(&0u64.to_be_bytes()); // no delay
    m.push(0); // no not-before
    put(&mut m, MessageId::new().to_string().as_bytes());
    m.extend_from_slice(&[0; 40]); // room for the count check, then the record stops short
    m
}

/// One transaction of 100 000 messages (several logical messages, read with a buffer of
/// 10 000): all delivered, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_of_100_000_messages_is_delivered_whole_and_in_order() {
    let w = wal(KeepOrder::default()).await;
    let broker = RecordingPublisher::new();
    let (stop, task) = spawn(relay(&w, broker.clone()));
    let n = 100_000;
    let msgs: Vec<Message> = (0..n)
        .map(|i| {
            Message::new("o", format!("k{}/{i:06}", i % 10))
                .stream("s")
                .key(format!("k{}", i % 10))
        })
        .collect();
    commit(&w, msgs).await;
    eventually("100 000 delivered", Duration::from_secs(120), || async {
        broker.count() >= n
    })
    .await;
    for (_, list) in first_deliveries(&broker.published()) {
        assert_eq!(list.len(), n / 10);
        assert!(list.windows(2).all(|p| p[0] < p[1]), "out of order");
    }
    stop.send(()).unwrap();
    task.await.unwrap().0.unwrap();
}

/// Configuration errors say what is wrong: a server without `wal_level = logical`, a bad
/// prefix, a slot that does not exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misconfiguration_is_a_clear_error() {
    let plain = PgCluster::create(&[]);
    let table = PgStore::connect(&plain.url()).await.unwrap();
    let store = WalStore::new(table.clone(), "outbox").unwrap();
    let e = store.setup(SLOT, PUBLICATION).await.unwrap_err();
    assert!(e.to_string().contains("wal_level = logical"), "{e}");
    assert!(WalStore::new(table, "bad prefix").is_err());
    let w = wal(KeepOrder::default()).await;
    let r = WalRelay::builder(&w.cluster.url(), w.store.clone(), RecordingPublisher::new())
        .slot("no_such_slot")
        .publication(PUBLICATION)
        .build()
        .unwrap();
    let e = tokio::time::timeout(Duration::from_secs(30), r.run(std::future::pending()))
        .await
        .expect("a missing slot ends the run")
        .unwrap_err();
    assert!(e.to_string().contains("no_such_slot"), "{e}");
}

/// A broker outage under load: every publish fails for a while (transiently) while writers
/// keep committing. Units move to the table as their retries in memory run out, the table's
/// relay delivers them when the broker is back, and they flow from the WAL again after; every
/// message is delivered, first deliveries in commit order per key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_loses_nothing_and_keeps_order_through_the_table() {
    let w = Arc::new(wal(KeepOrder::default()).await);
    let broker = RecordingPublisher::new();
    let down = Arc::new(AtomicBool::new(false));
    let d2 = down.clone();
    let faulty = FaultyPublisher::new(broker.clone(), move |_| {
        d2.load(Ordering::SeqCst)
            .then(|| Error::transient("broker unreachable"))
    });
    let (stop, task) = spawn(relay(&w, faulty));
    let mut expected: HashMap<String, Vec<String>> = HashMap::new();
    for t in 0..300 {
        if t == 100 {
            down.store(true, Ordering::SeqCst);
        }
        if t == 200 {
            down.store(false, Ordering::SeqCst);
        }
        let msgs: Vec<Message> = (0..3)
            .map(|j| {
                let key = format!("k{}", (t * 3 + j) % 8);
                let body = format!("{key}/{t}/{j}");
                expected.entry(key.clone()).or_default().push(body.clone());
                Message::new("o", body).stream("s").key(key)
            })
            .collect();
        commit(&w, msgs).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eventually(
        "everything delivered after the outage",
        Duration::from_secs(60),
        || async {
            first_deliveries(&broker.published())
                .values()
                .map(Vec::len)
                .sum::<usize>()
                == 900
        },
    )
    .await;
    assert_eq!(first_deliveries(&broker.published()), expected);
    // The units came back from the table: new messages flow from the WAL again.
    assert!(
        !task.is_finished(),
        "the relay kept running through the outage"
    );
    eventually("units back on the WAL", Duration::from_secs(30), || async {
        w.store.stats().await.unwrap().total().pending == 0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = broker.count();
    commit(
        &w,
        vec![Message::new("o", "k0/after").stream("s").key("k0")],
    )
    .await;
    eventually(
        "the last message delivered",
        Duration::from_secs(30),
        || async { broker.count() > before },
    )
    .await;
    stop.send(()).unwrap();
    let (result, relay) = task.await.unwrap();
    result.unwrap();
    let stats = relay.stats();
    assert!(
        stats.aside > 0,
        "the outage sent units to the table: {stats:?}"
    );
    assert!(stats.published > 0);
    assert_eq!(stats.dead, 0);
}

/// A graceful stop records the last confirmed position even when the relay's periodic
/// status update has not gone out yet (30 s here): a new relay publishes only what is new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_records_its_position_so_a_restart_publishes_nothing_twice() {
    let w = wal(KeepOrder::default()).await;
    let slow_status = |publisher: RecordingPublisher| {
        WalRelay::builder(&w.cluster.url(), w.store.clone(), publisher)
            .slot(SLOT)
            .publication(PUBLICATION)
            .status_interval(Duration::from_secs(30))
            .build()
            .unwrap()
    };
    let first = RecordingPublisher::new();
    let (stop, task) = spawn(slow_status(first.clone()));
    for i in 0..50 {
        commit(
            &w,
            vec![Message::new("o", format!("m{i}")).stream("s").key("k")],
        )
        .await;
    }
    eventually("50 published", Duration::from_secs(30), || async {
        first.count() >= 50
    })
    .await;
    stop.send(()).unwrap();
    task.await.unwrap().0.unwrap();
    let again = RecordingPublisher::new();
    let (stop, task) = spawn(slow_status(again.clone()));
    commit(
        &w,
        vec![Message::new("o", "after-restart").stream("s").key("k")],
    )
    .await;
    eventually("the new message", Duration::from_secs(30), || async {
        again.count() >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let texts: Vec<String> = again.published().iter().map(text).collect();
    assert_eq!(
        texts,
        vec!["after-restart"],
        "a graceful restart published old messages again"
    );
    stop.send(()).unwrap();
    task.await.unwrap().0.unwrap();
}

/// Least privilege (`outbox grants --wal`): the writer role only emits (no table
/// privilege), another login can no longer hand the relay a message, and the relay role
/// (REPLICATION, plus inserts for what it writes aside) streams, publishes and dead-letters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_privilege_roles_for_the_wal_relay() {
    use outbox_sql::roles::{postgres, postgres_wal, Roles};
    let w = wal(KeepOrder::dead_letter()).await;
    let table = w.store.table().table().to_owned();
    let roles = Roles {
        writer: Some("wal_writer".into()),
        relay: Some("wal_relay".into()),
        admin: None,
    };
    let pool = w.store.table().pool();
    for role in ["wal_writer", "wal_relay", "intruder"] {
        sqlx::query(&format!("CREATE ROLE {role} LOGIN"))
            .execute(pool)
            .await
            .unwrap();
    }
    for statement in postgres(&table, &roles)
        .unwrap()
        .into_iter()
        .chain(postgres_wal(&table, &roles, false).unwrap())
    {
        sqlx::query(&statement).execute(pool).await.unwrap();
    }
    let url_as = |role: &str| w.cluster.url().replace("postgres@", &format!("{role}@"));
    let options = outbox_sql::postgres::PgOptions {
        table: table.clone(),
        ..Default::default()
    };

    // Another login cannot emit a message any more.
    let intruder = sqlx::PgPool::connect(&url_as("intruder")).await.unwrap();
    let e = sqlx::query("SELECT pg_logical_emit_message(true, 'outbox', '\\x00'::bytea)")
        .execute(&intruder)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("permission denied"), "{e}");

    // The relay, as its role: publishes, and writes the refused message aside.
    let relay_table = PgStore::connect_with(&url_as("wal_relay"), options.clone())
        .await
        .unwrap();
    let broker = RecordingPublisher::new();
    let faulty = FaultyPublisher::new(broker.clone(), |e| {
        (text(e) == "refused").then(|| Error::permanent("no"))
    });
    let relay = WalRelay::builder(
        &url_as("wal_relay"),
        WalStore::new(relay_table, "outbox").unwrap(),
        faulty,
    )
    .slot(SLOT)
    .publication(PUBLICATION)
    .build()
    .unwrap();
    let (stop, task) = spawn(relay);

    // The writer, as its role: emits; it can read no row of the table.
    let writer_table = PgStore::connect_with(&url_as("wal_writer"), options)
        .await
        .unwrap();
    let writer = WalStore::new(writer_table.clone(), "outbox").unwrap();
    let outbox = Outbox::writer(writer)
        .strategy(KeepOrder::dead_letter())
        .build()
        .unwrap();
    let mut tx = writer_table.pool().begin().await.unwrap();
    let _ = outbox
        .enqueue(
            &mut tx,
            ["one", "refused", "two"].map(|t| Message::new("o", t).stream("s").key("k")),
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert!(sqlx::query(&format!("SELECT payload FROM {table}"))
        .fetch_all(writer_table.pool())
        .await
        .is_err());

    eventually(
        "published as the relay role",
        Duration::from_secs(30),
        || async { broker.count() >= 2 },
    )
    .await;
    assert_eq!(
        first_deliveries(&broker.published())["k"],
        vec!["one", "two"]
    );
    eventually(
        "the refused one dead-lettered by the relay role",
        Duration::from_secs(30),
        || async { w.store.dead_letters(None, 10).await.unwrap().len() == 1 },
    )
    .await;
    stop.send(()).unwrap();
    task.await.unwrap().0.unwrap();
}

/// The replication connection takes the store URL's TLS parameters: with
/// `sslmode=require` the relay's walsender session is encrypted (`pg_stat_ssl`), and with
/// `sslmode=verify-full` against a CA that did not sign the server's certificate it never
/// streams (an error, retried, nothing published).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replication_connection_uses_tls_as_the_url_says() {
    let w = wal(KeepOrder::default()).await;
    let tls_url = format!("{}?sslmode=require", w.cluster.url());
    let broker = RecordingPublisher::new();
    let relay = WalRelay::builder(&tls_url, w.store.clone(), broker.clone())
        .slot(SLOT)
        .publication(PUBLICATION)
        .build()
        .unwrap();
    let (stop, task) = spawn(relay);
    commit(&w, vec![Message::new("o", "over tls").stream("s").key("k")]).await;
    eventually("published over TLS", Duration::from_secs(30), || async {
        broker.count() == 1
    })
    .await;
    let encrypted: bool = sqlx::query_scalar(
        "SELECT bool_and(s.ssl) FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid)",
    )
    .fetch_one(w.store.table().pool())
    .await
    .unwrap();
    assert!(encrypted, "the walsender session is not encrypted");
    stop.send(()).unwrap();
    task.await.unwrap().0.unwrap();

    // A CA of the test's own, which did not sign the server's (snakeoil) certificate.
    let pki = outbox_testkit::Pki::new("wal-tls");
    let wrong_ca = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        w.cluster.url(),
        pki.ca_path().display()
    );
    let refused = RecordingPublisher::new();
    let relay = WalRelay::builder(&wrong_ca, w.store.clone(), refused.clone())
        .slot(SLOT)
        .publication(PUBLICATION)
        .build()
        .unwrap();
    let (stop, task) = spawn(relay);
    commit(&w, vec![Message::new("o", "never").stream("s").key("k")]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(refused.count(), 0, "streamed through an unverified server");
    stop.send(()).unwrap();
    let (result, relay) = task.await.unwrap();
    result.unwrap();
    assert_eq!(relay.stats().sessions, 0);
}

/// A unit waiting behind a head that backs off (1 s) does not spin the relay: rounds run
/// when something is due, not in a loop. Other units flow meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backing_off_head_does_not_spin_the_relay() {
    let w = wal(KeepOrder::default()).await;
    let broker = RecordingPublisher::new();
    let faulty = FaultyPublisher::new(broker.clone(), |e| {
        (text(e) == "a/1").then(|| Error::transient("not yet"))
    });
    let relay = WalRelay::builder(&w.cluster.url(), w.store.clone(), faulty)
        .slot(SLOT)
        .publication(PUBLICATION)
        .retry(RetryPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(1),
            multiplier: 1.0,
            jitter: 0.0,
            max_attempts: 100,
        })
        .memory_attempts(10)
        .build()
        .unwrap();
    let (stop, task) = spawn(relay);
    let m = |k: &str, i: usize| Message::new("o", format!("{k}/{i}")).stream("s").key(k);
    commit(&w, (1..=20).map(|i| m("a", i)).collect()).await;
    commit(&w, vec![m("b", 1)]).await;
    eventually(
        "unit b flows past a's backing-off head",
        Duration::from_secs(10),
        || async { first_deliveries(&broker.published()).contains_key("b") },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    stop.send(()).unwrap();
    let (result, relay) = task.await.unwrap();
    result.unwrap();
    let rounds = relay.stats().rounds;
    // About one round per event burst and per retry (two or three in 2.5 s): a spinning
    // loop runs tens of thousands.
    assert!(
        rounds < 200,
        "{rounds} rounds while a head backed off: the loop spins"
    );
    assert!(!first_deliveries(&broker.published()).contains_key("a"));
}

/// Messages are input: with verification keys, a message signed with another key and an
/// unsigned one are dead letters; a signed one is published. A payload over the relay's
/// limit is a dead letter too. The stream goes on past all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_forged_and_oversized_messages_are_dead_letters() {
    use outbox_core::{Delivery, Signer, SigningKey};
    let w = wal(KeepOrder::default()).await;
    let key = SigningKey::new("k1", b"the-relay-secret-0123456789".to_vec()).unwrap();
    let other = SigningKey::new("k1", b"not-the-secret-0123456789".to_vec()).unwrap();
    let broker = RecordingPublisher::new();
    let relay = WalRelay::builder(&w.cluster.url(), w.store.clone(), broker.clone())
        .slot(SLOT)
        .publication(PUBLICATION)
        .delivery(Delivery {
            signer: Some(Signer::new(key.clone())),
            max_payload_bytes: 64,
            ..Default::default()
        })
        .build()
        .unwrap();
    let (stop, task) = spawn(relay);
    let writer = |signer: Option<SigningKey>| {
        let b = Outbox::writer(w.store.clone()).strategy(KeepOrder::default());
        match signer {
            Some(k) => b.signer(Signer::new(k)),
            None => b,
        }
        .build()
        .unwrap()
    };
    let m = |t: &str| Message::new("o", t.to_owned()).stream("s").key("k");
    for (outbox, msg) in [
        (writer(None), m("unsigned")),
        (writer(Some(other)), m("forged")),
        (writer(Some(key.clone())), m(&"x".repeat(100))),
        (writer(Some(key)), m("signed")),
    ] {
        let mut tx = w.store.table().pool().begin().await.unwrap();
        let _ = outbox.enqueue(&mut tx, [msg]).await.unwrap();
        tx.commit().await.unwrap();
    }
    eventually(
        "the signed message published",
        Duration::from_secs(30),
        || async { broker.count() >= 1 },
    )
    .await;
    assert_eq!(first_deliveries(&broker.published())["k"], vec!["signed"]);
    // Written aside in the round that published the signed one, just after its publish.
    eventually("three dead letters", Duration::from_secs(10), || async {
        w.store.dead_letters(None, 10).await.unwrap().len() == 3
    })
    .await;
    let dead = w.store.dead_letters(None, 10).await.unwrap();
    let mut payloads: Vec<usize> = dead
        .iter()
        .map(|d| d.envelope.message.payload.len())
        .collect();
    payloads.sort();
    assert_eq!(payloads, vec![6, 8, 100], "{dead:?}");
    assert!(dead.iter().all(|d| d.last_error.is_some()));
    stop.send(()).unwrap();
    task.await.unwrap().0.unwrap();
}

/// The WAL relay decides signatures by the polling relay's rule: with keys and
/// `require_signatures(false)` (the CLI's `--allow-unsigned`) an unsigned message is
/// published and a forged one is still a dead letter; without keys, a signed message cannot
/// be checked and is a dead letter, an unsigned one is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_unsigned_and_keyless_relays_follow_the_polling_rule() {
    use outbox_core::{Delivery, Signer, SigningKey};
    let w = wal(KeepOrder::default()).await;
    let key = SigningKey::new("k1", b"the-relay-secret-0123456789".to_vec()).unwrap();
    let other = SigningKey::new("k1", b"not-the-secret-0123456789".to_vec()).unwrap();
    let writer = |signer: Option<&SigningKey>| {
        let b = Outbox::writer(w.store.clone()).strategy(KeepOrder::default());
        match signer {
            Some(k) => b.signer(Signer::new(k.clone())),
            None => b,
        }
        .build()
        .unwrap()
    };
    // Each message on a unit of its own, so that a dead letter holds nothing back.
    let write = |outbox: Outbox<WalStore>, text: &'static str| {
        let store = w.store.clone();
        async move {
            let mut tx = store.table().pool().begin().await.unwrap();
            let m = Message::new("o", text).stream("s").key(text);
            let _ = outbox.enqueue(&mut tx, [m]).await.unwrap();
            tx.commit().await.unwrap();
        }
    };
    let run = |delivery: Delivery, require: bool, broker: RecordingPublisher| {
        WalRelay::builder(&w.cluster.url(), w.store.clone(), broker)
            .slot(SLOT)
            .publication(PUBLICATION)
            .status_interval(Duration::from_millis(100))
            .delivery(delivery)
            .require_signatures(require)
            .build()
            .unwrap()
    };
    let published = |b: &RecordingPublisher| {
        let mut v: Vec<String> = b.published().iter().map(text).collect();
        v.sort();
        v
    };

    // Keys loaded, unsigned allowed.
    let broker = RecordingPublisher::new();
    let keyed = Delivery {
        signer: Some(Signer::new(key.clone())),
        ..Default::default()
    };
    let (stop, task) = spawn(run(keyed, false, broker.clone()));
    write(writer(None), "unsigned-1").await;
    write(writer(Some(&other)), "forged").await;
    write(writer(Some(&key)), "signed-1").await;
    eventually(
        "two published, one dead",
        Duration::from_secs(30),
        || async {
            broker.count() >= 2 && w.store.dead_letters(None, 10).await.unwrap().len() == 1
        },
    )
    .await;
    assert_eq!(published(&broker), ["signed-1", "unsigned-1"]);
    let dead = w.store.dead_letters(None, 10).await.unwrap();
    assert_eq!(text(&dead[0].envelope), "forged");
    stop.send(()).unwrap();
    task.await.unwrap().0.unwrap();

    // No keys: an unsigned message goes out, a signed one is unverifiable.
    let broker = RecordingPublisher::new();
    let (stop, task) = spawn(run(Delivery::default(), true, broker.clone()));
    write(writer(Some(&key)), "signed-2").await;
    write(writer(None), "unsigned-2").await;
    eventually(
        "one published, two dead",
        Duration::from_secs(30),
        || async {
            broker.count() >= 1 && w.store.dead_letters(None, 10).await.unwrap().len() == 2
        },
    )
    .await;
    assert_eq!(published(&broker), ["unsigned-2"]);
    let dead = w.store.dead_letters(None, 10).await.unwrap();
    let why: Vec<_> = dead
        .iter()
        .filter(|d| text(&d.envelope) == "signed-2")
        .map(|d| d.last_error.clone().unwrap_or_default())
        .collect();
    assert!(why[0].contains("unverifiable"), "{why:?}");
    stop.send(()).unwrap();
    task.await.unwrap().0.unwrap();
}
