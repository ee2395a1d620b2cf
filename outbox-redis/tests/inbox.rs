//! The inbox end to end on real Redis Streams and SQLite: duplicates (the relay's and the
//! broker's) give one effect, two members of one group at once give one effect, a consumer
//! that committed but never acknowledged gets its entries again and does nothing twice,
//! a transient handler failure is retried, a poison message becomes a dead letter while the
//! others are processed, and an entry without an id is kept, not processed, not lost.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_core::{
    async_trait, Consumer, ConsumerReport, Envelope, Error, Incoming, Message, MessageId,
    Publisher, Received, Retry, RetryPolicy, Source,
};
use outbox_redis::{RedisPublisher, RedisStreamSource};
use outbox_sqlite::rusqlite::Transaction;
use outbox_sqlite::{InboxTable, SqliteStore};

fn url() -> String {
    std::env::var("OUTBOX_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into())
}

fn key(name: &str) -> String {
    format!("inbox-{name}-{}", uuid::Uuid::now_v7().simple())
}

fn envelopes(stream: &str, n: usize) -> Vec<Envelope> {
    (0..n)
        .map(|i| Envelope {
            id: MessageId::new(),
            created_at: std::time::SystemTime::now(),
            message: Message::new(stream, i.to_string().into_bytes())
                .stream("payments")
                .key(format!("k{}", i % 3))
                .header("tenant", "acme"),
        })
        .collect()
}

async fn publish(batch: &[Envelope]) {
    let p = RedisPublisher::connect(&url()).await.unwrap();
    let out = p.publish_batch(&batch.iter().collect::<Vec<_>>()).await;
    assert!(out.iter().all(Result::is_ok), "{out:?}");
}

struct Db {
    _dir: tempfile::TempDir,
    store: SqliteStore,
    inbox: InboxTable,
}

fn db() -> Db {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("app.db")).unwrap();
    store
        .connect()
        .unwrap()
        .execute_batch("CREATE TABLE effects (n INTEGER NOT NULL, msg TEXT NOT NULL)")
        .unwrap();
    let inbox = store.inbox_table("inbox").unwrap();
    inbox.migrate_now().unwrap();
    Db {
        _dir: dir,
        store,
        inbox,
    }
}

/// The handler: one row in `effects` per processed message.
fn record(tx: &Transaction<'_>, m: &Received) -> outbox_core::Result<()> {
    let n: i64 = m.text()?.parse().map_err(|_| {
        Error::handler(
            Retry::Permanent,
            format!("payload of {} is not a number", m.id),
        )
    })?;
    tx.execute(
        "INSERT INTO effects (n, msg) VALUES (?1, ?2)",
        (n, m.id.to_string()),
    )
    .map_err(outbox_sqlite::map_err)?;
    Ok(())
}

fn effects(store: &SqliteStore) -> HashMap<i64, usize> {
    let conn = store.connect().unwrap();
    let mut stmt = conn.prepare("SELECT n FROM effects").unwrap();
    let mut out = HashMap::new();
    for n in stmt.query_map([], |r| r.get::<_, i64>(0)).unwrap() {
        *out.entry(n.unwrap()).or_insert(0) += 1;
    }
    out
}

fn quick_retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(100),
        max_attempts,
        ..Default::default()
    }
}

async fn drain<S: Source>(
    consumer: &mut Consumer<S>,
    until: impl Fn(&ConsumerReport) -> bool,
) -> ConsumerReport {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut total = ConsumerReport::default();
    while !until(&total) {
        assert!(Instant::now() < deadline, "consumer stalled at {total:?}");
        total += consumer.run_once().await.unwrap();
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_of_a_group_give_one_effect_per_message_though_each_is_there_twice() {
    let stream = key("twice");
    let batch = envelopes(&stream, 60);
    // Every message twice: a relay that published and crashed before recording it.
    publish(&batch).await;
    publish(&batch).await;
    let db = db();
    let mut members = Vec::new();
    for member in ["a", "b"] {
        let source = RedisStreamSource::connect(&url(), &stream, "billing", member)
            .await
            .unwrap();
        let inbox = db.inbox.consumer("billing", record).unwrap();
        members.push(
            Consumer::new(source, inbox)
                .batch_size(7)
                .unwrap()
                .wait(Duration::from_millis(100)),
        );
    }
    let processed = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = members
        .into_iter()
        .map(|mut c| {
            let processed = processed.clone();
            tokio::spawn(async move {
                let mut total = ConsumerReport::default();
                let deadline = Instant::now() + Duration::from_secs(30);
                // Until the group has taken all 120 entries and both members are idle.
                loop {
                    assert!(Instant::now() < deadline, "stalled at {total:?}");
                    let r = c.run_once().await.unwrap();
                    processed.fetch_add(r.processed as usize, Ordering::SeqCst);
                    total += r;
                    if r == ConsumerReport::default() && processed.load(Ordering::SeqCst) >= 60 {
                        return total;
                    }
                }
            })
        })
        .collect();
    let mut total = ConsumerReport::default();
    for h in handles {
        total += h.await.unwrap();
    }
    let effects = effects(&db.store);
    println!("two members: {total:?}");
    assert_eq!(effects.len(), 60, "every message had an effect");
    assert!(
        effects.values().all(|&c| c == 1),
        "no message twice: {effects:?}"
    );
    assert_eq!(total.processed, 60);
    assert_eq!(total.duplicates, 60, "each second copy recognised");
}

/// A source whose first acknowledgement is lost: the consumer "dies" between its commit and
/// its `XACK`.
struct LoseFirstAck<S>(S, bool);

#[async_trait]
impl<S: Source> Source for LoseFirstAck<S> {
    type Token = S::Token;
    async fn receive(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> outbox_core::Result<Vec<Incoming<S::Token>>> {
        self.0.receive(max, wait).await
    }
    async fn ack(&mut self, tokens: Vec<S::Token>) -> outbox_core::Result<()> {
        if !self.1 {
            self.1 = true;
            return Err(Error::transient("the consumer died before XACK"));
        }
        self.0.ack(tokens).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_committed_but_never_acknowledged_does_nothing_twice() {
    let stream = key("noack");
    publish(&envelopes(&stream, 20)).await;
    let db = db();
    let source = RedisStreamSource::connect(&url(), &stream, "g", "member-1")
        .await
        .unwrap();
    let mut first = Consumer::new(
        LoseFirstAck(source, false),
        db.inbox.consumer("billing", record).unwrap(),
    )
    .batch_size(50)
    .unwrap();
    let e = first.run_once().await.unwrap_err();
    assert!(e.to_string().contains("before XACK"), "{e}");
    assert_eq!(effects(&db.store).len(), 20, "the effects committed");

    // The same member again (a restart): its unacknowledged entries come back first.
    let source = RedisStreamSource::connect(&url(), &stream, "g", "member-1")
        .await
        .unwrap();
    let mut again = Consumer::new(source, db.inbox.consumer("billing", record).unwrap());
    let r = again.run_once().await.unwrap();
    assert_eq!(r.duplicates, 20, "{r:?}");
    assert_eq!(r.processed, 0);
    assert!(effects(&db.store).values().all(|&c| c == 1));
    let mut conn = redis::Client::open(url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let pending: redis::Value = redis::cmd("XPENDING")
        .arg(&stream)
        .arg("g")
        .query_async(&mut conn)
        .await
        .unwrap();
    let redis::Value::Array(p) = pending else {
        panic!("{pending:?}")
    };
    assert_eq!(p[0], redis::Value::Int(0), "all acknowledged now");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_retried_poison_dead_lettered_requeued_and_unreadable_entries_kept() {
    let stream = key("poison");
    let batch = envelopes(&stream, 10);
    publish(&batch).await;
    // An entry no outbox wrote: no id field.
    let mut conn = redis::Client::open(url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("payload")
        .arg("hello")
        .query_async(&mut conn)
        .await
        .unwrap();
    let db = db();
    let flaky_left = Arc::new(AtomicUsize::new(2)); // message 3 fails twice, then works
    let healed = Arc::new(AtomicBool::new(false)); // message 5 fails until healed
    let (f, h) = (flaky_left.clone(), healed.clone());
    let handler = move |tx: &Transaction<'_>, m: &Received| {
        match m.text()? {
            "3" if f.load(Ordering::SeqCst) > 0 => {
                f.fetch_sub(1, Ordering::SeqCst);
                return Err(Error::handler(Retry::Transient, "flaky downstream"));
            }
            "5" if !h.load(Ordering::SeqCst) => {
                return Err(Error::handler(Retry::Transient, "poison: always fails"));
            }
            _ => {}
        }
        record(tx, m)
    };
    let source = RedisStreamSource::connect(&url(), &stream, "g", "m")
        .await
        .unwrap();
    let mut consumer = Consumer::new(source, db.inbox.consumer("billing", handler).unwrap())
        .retry(quick_retry(3))
        .unwrap();
    let r = drain(&mut consumer, |t| t.processed + t.dead_lettered >= 11).await;
    println!("poison run: {r:?}");
    assert_eq!(r.processed, 9, "the flaky one included");
    assert_eq!(
        r.dead_lettered, 2,
        "the poison one and the entry without an id"
    );
    assert_eq!(r.failed_attempts, 2 + 3);
    let e = effects(&db.store);
    assert_eq!(e.len(), 9);
    assert!(!e.contains_key(&5));

    let dead = db.inbox.dead_letters(Some("billing"), 10).await.unwrap();
    assert_eq!(dead.len(), 2);
    let poison = dead.iter().find(|d| d.message.payload == b"5").unwrap();
    assert_eq!(poison.message.id, batch[5].id);
    assert_eq!(poison.attempts, 3);
    assert!(poison.error.as_deref().unwrap().contains("always fails"));
    assert_eq!(
        poison.message.headers.get("tenant").map(String::as_str),
        Some("acme")
    );
    assert_eq!(poison.message.key.as_deref(), Some("k2"));
    let unreadable = dead.iter().find(|d| d.message.payload == b"hello").unwrap();
    assert!(
        unreadable
            .error
            .as_deref()
            .unwrap()
            .contains("no `id` field"),
        "{:?}",
        unreadable.error
    );

    // The operator fixes the cause and requeues: processed once, on the next round.
    healed.store(true, Ordering::SeqCst);
    db.inbox.requeue("billing", batch[5].id).await.unwrap();
    assert_eq!(
        db.inbox
            .requeue("billing", batch[5].id)
            .await
            .unwrap_err()
            .kind(),
        outbox_core::ErrorKind::NotFound
    );
    let r = consumer.run_once().await.unwrap();
    assert_eq!(r.processed, 1, "{r:?}");
    assert_eq!(effects(&db.store).get(&5), Some(&1));
    assert_eq!(
        db.inbox
            .dead_letters(Some("billing"), 10)
            .await
            .unwrap()
            .len(),
        1
    );

    // Retention: processed marks older than the horizon go; none is that old yet.
    assert_eq!(
        db.inbox
            .clean(Duration::from_secs(3600), 1000)
            .await
            .unwrap(),
        0
    );
    assert_eq!(db.inbox.clean(Duration::ZERO, 1000).await.unwrap(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_inbox_table_is_one_clear_error_and_nothing_is_acknowledged() {
    let stream = key("notable");
    publish(&envelopes(&stream, 3)).await;
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("app.db")).unwrap();
    let table = store.inbox_table("never_migrated").unwrap();
    let source = RedisStreamSource::connect(&url(), &stream, "g", "m")
        .await
        .unwrap();
    let mut consumer = Consumer::new(source, table.consumer("billing", record).unwrap());
    let e = consumer.run_once().await.unwrap_err();
    assert!(
        e.to_string()
            .contains("inbox table never_migrated does not exist"),
        "{e}"
    );
    // Still pending for the group: delivered again once the table exists.
    table.migrate_now().unwrap();
    store
        .connect()
        .unwrap()
        .execute_batch("CREATE TABLE effects (n INTEGER NOT NULL, msg TEXT NOT NULL)")
        .unwrap();
    let source = RedisStreamSource::connect(&url(), &stream, "g", "m")
        .await
        .unwrap();
    let mut consumer = Consumer::new(source, table.consumer("billing", record).unwrap());
    let r = consumer.run_once().await.unwrap();
    assert_eq!(r.processed, 3, "{r:?}");
}
