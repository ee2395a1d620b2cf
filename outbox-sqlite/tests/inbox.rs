//! The SQLite inbox, step by step (the broker end to end is in `outbox-redis/tests/inbox.rs`):
//! attempts are counted before the handler runs, a message marked by one delivery is a
//! duplicate for another one already under way, a message that crashed the consumer
//! `max_attempts` times is a dead letter without running again, and a permanent handler
//! error dead-letters at once.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use outbox_core::{
    async_trait, Consumer, Inbox, Incoming, MessageId, Processed, Received, RetryPolicy, Seen,
    Source,
};
use outbox_sqlite::rusqlite::Transaction;
use outbox_sqlite::SqliteStore;

/// Deliveries handed out once each; acknowledged tokens are recorded. (A stand-in for a
/// broker in these engine tests; the real brokers have their own.)
#[derive(Default)]
struct Queue {
    waiting: VecDeque<Received>,
    acked: Vec<MessageId>,
}

#[async_trait]
impl Source for Queue {
    type Token = MessageId;
    async fn receive(
        &mut self,
        max: usize,
        _wait: Duration,
    ) -> outbox_core::Result<Vec<Incoming<MessageId>>> {
        let n = max.min(self.waiting.len());
        Ok(self
            .waiting
            .drain(..n)
            .map(|m| Incoming {
                token: m.id,
                message: Ok(m),
            })
            .collect())
    }
    async fn ack(&mut self, tokens: Vec<MessageId>) -> outbox_core::Result<()> {
        self.acked.extend(tokens);
        Ok(())
    }
}

fn setup() -> (tempfile::TempDir, SqliteStore, outbox_sqlite::InboxTable) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("app.db")).unwrap();
    store
        .connect()
        .unwrap()
        .execute_batch("CREATE TABLE effects (msg TEXT NOT NULL)")
        .unwrap();
    let table = store.inbox_table("inbox").unwrap();
    table.migrate_now().unwrap();
    (dir, store, table)
}

fn count(store: &SqliteStore) -> i64 {
    store
        .connect()
        .unwrap()
        .query_row("SELECT COUNT(*) FROM effects", [], |r| r.get(0))
        .unwrap()
}

#[tokio::test]
async fn two_deliveries_under_way_at_once_give_one_effect() {
    let (_dir, store, table) = setup();
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let inbox = table
        .consumer("billing", move |tx: &Transaction<'_>, m: &Received| {
            r.fetch_add(1, Ordering::SeqCst);
            tx.execute("INSERT INTO effects VALUES (?1)", [m.id.to_string()])
                .map_err(outbox_sqlite::map_err)?;
            Ok(())
        })
        .unwrap();
    let m = Received::new(MessageId::new(), "t", b"x".to_vec());
    // Both deliveries start before either is processed (two members after a rebalance).
    assert_eq!(
        inbox.start(&[m.id]).await.unwrap(),
        [Seen::New { attempts: 1 }]
    );
    assert_eq!(
        inbox.start(&[m.id]).await.unwrap(),
        [Seen::New { attempts: 2 }]
    );
    assert_eq!(inbox.process(&m).await.unwrap(), Processed::Done);
    assert_eq!(inbox.process(&m).await.unwrap(), Processed::Duplicate);
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran once");
    assert_eq!(count(&store), 1);
    assert_eq!(inbox.start(&[m.id]).await.unwrap(), [Seen::Done]);
    // Another consumer has its own marks.
    let other = table
        .consumer("audit", |_: &Transaction<'_>, _: &Received| Ok(()))
        .unwrap();
    assert_eq!(
        other.start(&[m.id]).await.unwrap(),
        [Seen::New { attempts: 1 }]
    );
}

#[tokio::test]
async fn a_message_that_crashed_the_consumer_max_attempts_times_is_a_dead_letter_unrun() {
    let (_dir, store, table) = setup();
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let handler = move |tx: &Transaction<'_>, m: &Received| {
        r.fetch_add(1, Ordering::SeqCst);
        tx.execute("INSERT INTO effects VALUES (?1)", [m.id.to_string()])
            .map_err(outbox_sqlite::map_err)?;
        Ok(())
    };
    let poison = Received::new(MessageId::new(), "t", b"boom".to_vec());
    let fine = Received::new(MessageId::new(), "t", b"ok".to_vec());
    // Three attempts started and none finished: three consumers killed in the handler.
    let inbox = table.consumer("billing", handler.clone()).unwrap();
    for _ in 0..3 {
        inbox.start(&[poison.id]).await.unwrap();
    }
    let source = Queue {
        waiting: [poison.clone(), fine.clone()].into(),
        ..Default::default()
    };
    let mut consumer = Consumer::new(source, table.consumer("billing", handler).unwrap())
        .retry(RetryPolicy {
            max_attempts: 3,
            ..Default::default()
        })
        .unwrap();
    let r = consumer.run_once().await.unwrap();
    assert_eq!((r.processed, r.dead_lettered), (1, 1), "{r:?}");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the poison did not run a fourth time"
    );
    assert_eq!(
        consumer.source_mut().acked,
        [poison.id, fine.id],
        "both acknowledged"
    );
    let dead = table.dead_letters(Some("billing"), 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert!(dead[0].error.as_deref().unwrap().contains("crash loop"));
    assert_eq!(dead[0].message.payload, b"boom");
    assert_eq!(count(&store), 1);
}

/// The consumer dies in the poison's handler, round after round: every round counted an
/// attempt at the whole batch (one transaction), so the messages behind the poison carry as
/// many attempts as the poison without ever having run. Only the poison is a crash loop; the
/// rest run when it is out of the way.
#[tokio::test]
async fn the_messages_behind_a_crash_loop_run_they_are_not_dead_letters() {
    let (_dir, store, table) = setup();
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let handler = move |tx: &Transaction<'_>, m: &Received| {
        r.fetch_add(1, Ordering::SeqCst);
        tx.execute("INSERT INTO effects VALUES (?1)", [m.id.to_string()])
            .map_err(outbox_sqlite::map_err)?;
        Ok(())
    };
    let first = Received::new(MessageId::new(), "t", b"ok".to_vec());
    let poison = Received::new(MessageId::new(), "t", b"boom".to_vec());
    let behind: Vec<Received> = (0..2)
        .map(|_| Received::new(MessageId::new(), "t", b"ok".to_vec()))
        .collect();
    let inbox = table.consumer("billing", handler.clone()).unwrap();
    // Round 1: the batch counted, `first` processed, the consumer killed in the poison's
    // handler. Rounds 2 and 3: the broker gives the unacknowledged rest again; killed again.
    let mut ids = vec![first.id, poison.id];
    ids.extend(behind.iter().map(|m| m.id));
    inbox.start(&ids).await.unwrap();
    assert_eq!(inbox.process(&first).await.unwrap(), Processed::Done);
    for _ in 0..2 {
        inbox.start(&ids[1..]).await.unwrap();
    }
    let mut waiting: VecDeque<Received> = [poison.clone()].into();
    waiting.extend(behind.iter().cloned());
    let mut consumer = Consumer::new(
        Queue {
            waiting,
            ..Default::default()
        },
        table.consumer("billing", handler).unwrap(),
    )
    .retry(RetryPolicy {
        max_attempts: 3,
        ..Default::default()
    })
    .unwrap();
    let r = consumer.run_once().await.unwrap();
    assert_eq!((r.processed, r.dead_lettered), (2, 1), "{r:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 3, "first, then the two behind");
    assert_eq!(count(&store), 3);
    let dead = table.dead_letters(Some("billing"), 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message.id, poison.id);
    assert!(dead[0].error.as_deref().unwrap().contains("crash loop"));
}

/// Effects in the order they committed.
fn effects_in_order(store: &SqliteStore) -> Vec<String> {
    let conn = store.connect().unwrap();
    let mut stmt = conn
        .prepare("SELECT msg FROM effects ORDER BY rowid")
        .unwrap();
    let rows = stmt.query_map([], |r| r.get(0)).unwrap();
    rows.map(Result::unwrap).collect()
}

/// Batched mode: a run of new messages commits in one transaction; a handler that fails
/// once (transient) rolls back its batch-mates, which are processed again without it, and
/// it is retried alone; one that fails permanently is a dead letter; every effect once, in
/// delivery order; a second copy in the same batch is a duplicate.
#[tokio::test]
async fn batched_mode_takes_a_failing_message_out_of_its_batch() {
    let (_dir, store, table) = setup();
    let runs = Arc::new(AtomicUsize::new(0));
    let flaky_failed = Arc::new(AtomicUsize::new(0));
    let (r, f) = (runs.clone(), flaky_failed.clone());
    let handler = move |tx: &Transaction<'_>, m: &Received| {
        r.fetch_add(1, Ordering::SeqCst);
        tx.execute("INSERT INTO effects VALUES (?1)", [m.text()?])
            .map_err(outbox_sqlite::map_err)?;
        match m.text()? {
            "flaky" if f.fetch_add(1, Ordering::SeqCst) == 0 => {
                Err(outbox_core::Error::transient("not yet"))
            }
            "poison" => Err(outbox_core::Error::permanent("never")),
            _ => Ok(()),
        }
    };
    let names = ["m0", "m1", "flaky", "m3", "poison", "m5"];
    let msgs: Vec<Received> = names
        .iter()
        .map(|n| Received::new(MessageId::new(), "t", n.as_bytes().to_vec()))
        .collect();
    let mut waiting: VecDeque<Received> = msgs.iter().cloned().collect();
    waiting.push_back(msgs[1].clone()); // a second copy in the same batch
    let mut consumer = Consumer::new(
        Queue {
            waiting,
            ..Default::default()
        },
        table.consumer("billing", handler).unwrap(),
    )
    .batched(true)
    .retry(RetryPolicy {
        initial: Duration::from_millis(1),
        ..Default::default()
    })
    .unwrap();
    let report = consumer.run_once().await.unwrap();
    assert_eq!(
        (
            report.processed,
            report.duplicates,
            report.dead_lettered,
            report.failed_attempts
        ),
        (5, 1, 1, 3),
        "{report:?}"
    );
    assert_eq!(
        effects_in_order(&store),
        ["m0", "m1", "flaky", "m3", "m5"],
        "each effect once, in delivery order"
    );
    // Handler runs: [m0 m1 flaky*] rolled back; [m0 m1]; flaky alone; [m3 poison*] rolled
    // back; [m3]; poison alone (permanent: no retry); [m5]; the copy of m1 runs nothing.
    assert_eq!(runs.load(Ordering::SeqCst), 3 + 2 + 1 + 2 + 1 + 1 + 1);
    assert_eq!(consumer.source_mut().acked.len(), 7, "all acknowledged");
    let dead = table.dead_letters(Some("billing"), 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message.payload, b"poison");
}

#[tokio::test]
async fn a_permanent_handler_error_dead_letters_at_once_and_rolls_back_its_writes() {
    let (_dir, store, table) = setup();
    let attempts = Arc::new(AtomicUsize::new(0));
    let a = attempts.clone();
    let handler = move |tx: &Transaction<'_>, m: &Received| {
        a.fetch_add(1, Ordering::SeqCst);
        tx.execute("INSERT INTO effects VALUES (?1)", [m.id.to_string()])
            .map_err(outbox_sqlite::map_err)?;
        let _: serde_json::Value = m.json()?; // not JSON: permanent
        Ok(())
    };
    let m = Received::new(MessageId::new(), "t", b"not json".to_vec());
    let mut consumer = Consumer::new(
        Queue {
            waiting: [m.clone()].into(),
            ..Default::default()
        },
        table.consumer("billing", handler).unwrap(),
    );
    let r = consumer.run_once().await.unwrap();
    assert_eq!((r.dead_lettered, r.failed_attempts), (1, 1), "{r:?}");
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        1,
        "no retry of a permanent error"
    );
    assert_eq!(count(&store), 0, "the handler's write rolled back");
    let dead = table.dead_letters(None, 10).await.unwrap();
    assert!(dead[0]
        .error
        .as_deref()
        .unwrap()
        .contains("not the JSON expected"));
}

/// A source whose first receive fails (a broker away), then delivers.
struct FlakySource(Queue, bool);

#[async_trait]
impl Source for FlakySource {
    type Token = MessageId;
    async fn receive(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> outbox_core::Result<Vec<Incoming<MessageId>>> {
        if !self.1 {
            self.1 = true;
            return Err(outbox_core::Error::transient("broker unreachable"));
        }
        self.0.receive(max, wait).await
    }
    async fn ack(&mut self, tokens: Vec<MessageId>) -> outbox_core::Result<()> {
        self.0.ack(tokens).await
    }
}

#[tokio::test]
async fn run_outlives_a_broker_error_and_stops_at_shutdown() {
    let (_dir, store, table) = setup();
    let msgs: Vec<Received> = (0..3)
        .map(|_| Received::new(MessageId::new(), "t", b"x".to_vec()))
        .collect();
    let inbox = table
        .consumer("billing", |tx: &Transaction<'_>, m: &Received| {
            tx.execute("INSERT INTO effects VALUES (?1)", [m.id.to_string()])
                .map_err(outbox_sqlite::map_err)?;
            Ok(())
        })
        .unwrap();
    let source = FlakySource(
        Queue {
            waiting: msgs.into(),
            ..Default::default()
        },
        false,
    );
    let mut consumer = Consumer::new(source, inbox)
        .retry(RetryPolicy {
            initial: Duration::from_millis(10),
            ..Default::default()
        })
        .unwrap()
        .wait(Duration::from_millis(10));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let store2 = store.clone();
    tokio::spawn(async move {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while count(&store2) < 3 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = stop.send(());
    });
    let report = tokio::time::timeout(
        Duration::from_secs(20),
        consumer.run(async {
            let _ = stopped.await;
        }),
    )
    .await
    .expect("run returned at shutdown");
    // The round that processed them may be abandoned by the shutdown before it reports:
    // what counts is that the effects are there once each and that run returned.
    assert!(report.processed <= 3, "{report:?}");
    assert_eq!(
        count(&store),
        3,
        "processed once each, after the failed receive"
    );
}

/// A delivery over `max_delivery_bytes` is never handled and never stored with its payload:
/// a dead letter with its id, headers and the size, acknowledged; its redelivery is a
/// duplicate; the messages around it are processed.
#[tokio::test]
async fn an_oversized_delivery_is_a_dead_letter_without_its_payload() {
    let (_dir, store, table) = setup();
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let inbox = table
        .consumer("billing", move |tx: &Transaction<'_>, m: &Received| {
            r.fetch_add(1, Ordering::SeqCst);
            tx.execute("INSERT INTO effects VALUES (?1)", [m.id.to_string()])
                .map_err(outbox_sqlite::map_err)?;
            Ok(())
        })
        .unwrap();
    let small = Received::new(MessageId::new(), "t", b"ok".to_vec());
    let mut big = Received::new(MessageId::new(), "t", vec![7u8; 64 * 1024]);
    big.headers.insert("x-trace".into(), "kept".into());
    let after = Received::new(MessageId::new(), "t", b"ok too".to_vec());
    let queue = Queue {
        waiting: [small.clone(), big.clone(), after.clone(), big.clone()]
            .into_iter()
            .collect(),
        acked: Vec::new(),
    };
    let other = table
        .consumer("other", |_: &Transaction<'_>, _: &Received| Ok(()))
        .unwrap();
    assert!(Consumer::new(Queue::default(), other)
        .max_delivery_bytes(10)
        .is_err());
    let mut consumer = Consumer::new(queue, inbox)
        .max_delivery_bytes(32 * 1024)
        .unwrap();
    let report = consumer.run_once().await.unwrap();
    assert_eq!(
        (report.processed, report.dead_lettered, report.duplicates),
        (2, 1, 1)
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert_eq!(count(&store), 2);
    assert_eq!(consumer.source_mut().acked.len(), 4, "all acknowledged");
    let dead = table.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message.id, big.id);
    assert!(dead[0].message.payload.is_empty(), "the payload was stored");
    assert_eq!(dead[0].message.headers["x-trace"], "kept");
    let error = dead[0].error.as_deref().unwrap();
    assert!(
        error.contains("65547 bytes is over max_delivery_bytes (32768)"),
        "{error}"
    );
}
