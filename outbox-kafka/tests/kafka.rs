//! Against a real Kafka-protocol broker: librdkafka's mock cluster (in-process, on
//! loopback), one cluster per test.

use std::collections::HashMap;
use std::time::Duration;

use outbox_core::{Envelope, ErrorKind, Message, MessageId, Publisher};
use outbox_kafka::rdkafka::config::ClientConfig;
use outbox_kafka::rdkafka::message::Message as _;
use outbox_kafka::rdkafka::mocking::MockCluster;
use outbox_kafka::KafkaPublisher;

mod common;
use common::{consume, header};

fn env(topic: &str, payload: &str) -> Envelope {
    Envelope {
        id: MessageId::new(),
        created_at: std::time::SystemTime::now(),
        message: Message::new(topic, payload.as_bytes().to_vec()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_carry_id_key_and_headers_and_keys_stay_on_one_partition() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("orders", 3, 1).unwrap();
    let publisher = KafkaPublisher::new(&cluster.bootstrap_servers()).unwrap();
    let mut batch = Vec::new();
    for i in 0..30 {
        let mut e = env("orders", &i.to_string());
        e.message = e
            .message
            .clone()
            .stream("orders")
            .header("schema", "v1")
            .content_type("text/plain");
        if i % 3 != 0 {
            e.message = e.message.clone().key(format!("k{}", i % 3));
        }
        batch.push(e);
    }
    let out = publisher
        .publish_batch(&batch.iter().collect::<Vec<_>>())
        .await;
    assert!(out.iter().all(|r| r.is_ok()), "{out:?}");

    let got = consume(cluster.bootstrap_servers(), "orders".into(), 30).await;
    let ids: HashMap<String, &Envelope> = batch.iter().map(|e| (e.id.to_string(), e)).collect();
    let mut partitions: HashMap<String, std::collections::HashSet<i32>> = HashMap::new();
    let mut order: HashMap<String, Vec<(i32, i64, usize)>> = HashMap::new();
    for m in &got {
        let id = header(m, "outbox-id").expect("outbox-id header");
        let sent = ids[&id];
        assert_eq!(m.payload().unwrap(), &sent.message.payload[..]);
        assert_eq!(header(m, "schema").as_deref(), Some("v1"));
        assert_eq!(header(m, "content-type").as_deref(), Some("text/plain"));
        assert_eq!(header(m, "outbox-stream").as_deref(), Some("orders"));
        let key = String::from_utf8(m.key().unwrap().to_vec()).unwrap();
        assert_eq!(
            key,
            sent.message.key.clone().unwrap_or_else(|| "orders".into()),
            "unkeyed: keyed by stream"
        );
        partitions
            .entry(key.clone())
            .or_default()
            .insert(m.partition());
        let n: usize = std::str::from_utf8(m.payload().unwrap())
            .unwrap()
            .parse()
            .unwrap();
        order
            .entry(key)
            .or_default()
            .push((m.partition(), m.offset(), n));
    }
    for (key, p) in &partitions {
        assert_eq!(p.len(), 1, "key {key} spread over partitions {p:?}");
    }
    for (key, mut v) in order {
        v.sort();
        let ns: Vec<usize> = v.iter().map(|x| x.2).collect();
        let mut sorted = ns.clone();
        sorted.sort();
        assert_eq!(ns, sorted, "key {key}: offsets not in publish order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_records_fail_permanently_and_bad_settings_are_config_errors() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("t", 1, 1).unwrap();
    let publisher = KafkaPublisher::new(&cluster.bootstrap_servers()).unwrap();
    let big = "x".repeat(2 * 1024 * 1024);
    let e = publisher.publish(&env("t", &big)).await.unwrap_err();
    assert!(!e.is_transient(), "oversized is permanent: {e}");
    publisher.publish(&env("t", "small")).await.unwrap();

    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .set("no.such.setting", "1");
    assert_eq!(
        KafkaPublisher::from_config(config).unwrap_err().kind(),
        ErrorKind::Config
    );
}

/// Contract point 17 at the publisher: a record librdkafka refuses before sending (over its
/// size limit) keeps the later records of its key (its unit, on one partition) in the same
/// batch from being sent; other keys' records go. The consumer sees only those.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_record_keeps_its_keys_later_records_unsent() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("ordered", 1, 1).unwrap();
    let publisher = KafkaPublisher::new(&cluster.bootstrap_servers()).unwrap();
    assert!(publisher.ordered_batches());
    let keyed = |payload: &str, key: &str| {
        let mut e = env("ordered", payload);
        e.message = e.message.clone().key(key);
        e
    };
    let big = "x".repeat(2 * 1024 * 1024);
    let batch = [
        keyed("a1", "a"),
        keyed(&big, "a"),
        keyed("a3", "a"),
        keyed("b1", "b"),
    ];
    let results = publisher
        .publish_batch(&batch.iter().collect::<Vec<_>>())
        .await;
    let ok: Vec<bool> = results.iter().map(Result::is_ok).collect();
    assert_eq!(ok, [true, false, false, true], "{results:?}");
    assert!(results[2].as_ref().unwrap_err().is_transient());
    let got = consume(cluster.bootstrap_servers(), "ordered".into(), 2).await;
    let mut payloads: Vec<&[u8]> = got.iter().map(|m| m.payload().unwrap()).collect();
    payloads.sort();
    assert_eq!(payloads, [&b"a1"[..], &b"b1"[..]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_in_the_middle_of_a_relay_run_loses_nothing() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("events", 4, 1).unwrap();
    let report = common::relay_through_an_outage(
        &cluster.bootstrap_servers(),
        "events",
        || cluster.broker_down(1).unwrap(),
        || cluster.broker_up(1).unwrap(),
    )
    .await;
    println!("kafka outage (mock cluster): {report}");
    report.assert_nothing_lost();
}

/// The real inbox, except that counting the first batch's attempts fails (the database
/// went away for a moment).
struct FailFirstStart<I>(I, std::sync::atomic::AtomicBool);

#[outbox_core::async_trait]
impl<I: outbox_core::Inbox> outbox_core::Inbox for FailFirstStart<I> {
    fn consumer(&self) -> &str {
        self.0.consumer()
    }
    async fn start(&self, ids: &[MessageId]) -> outbox_core::Result<Vec<outbox_core::Seen>> {
        if !self.1.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Err(outbox_core::Error::store("database unreachable"));
        }
        self.0.start(ids).await
    }
    async fn process(
        &self,
        m: &outbox_core::Received,
    ) -> outbox_core::Result<outbox_core::Processed> {
        self.0.process(m).await
    }
    async fn failed(&self, id: MessageId, e: &str) -> outbox_core::Result<u32> {
        self.0.failed(id, e).await
    }
    async fn dead_letter(&self, m: &outbox_core::Received, e: &str) -> outbox_core::Result<()> {
        self.0.dead_letter(m, e).await
    }
    async fn requeued(&self, limit: usize) -> outbox_core::Result<Vec<outbox_core::Received>> {
        self.0.requeued(limit).await
    }
}

/// A round that fails after its batch was received keeps the batch: the same consumer takes
/// it again on its next round. Kafka would not give it back (the consumer's position has
/// moved on), and committing a later batch's offsets would skip it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_round_is_retried_by_the_same_consumer_not_skipped() {
    use outbox_core::{Consumer, Received};
    use outbox_kafka::KafkaSource;
    use outbox_sqlite::rusqlite::Transaction;
    use outbox_sqlite::SqliteStore;

    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("invoices", 1, 1).unwrap();
    let publisher = KafkaPublisher::new(&cluster.bootstrap_servers()).unwrap();
    let first: Vec<Envelope> = (0..3).map(|i| env("invoices", &i.to_string())).collect();
    let out = publisher
        .publish_batch(&first.iter().collect::<Vec<_>>())
        .await;
    assert!(out.iter().all(|r| r.is_ok()), "{out:?}");

    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("app.db")).unwrap();
    store
        .connect()
        .unwrap()
        .execute_batch("CREATE TABLE effects (msg TEXT NOT NULL)")
        .unwrap();
    let table = store.inbox_table("inbox").unwrap();
    table.migrate_now().unwrap();
    let handler = |tx: &Transaction<'_>, m: &Received| {
        tx.execute("INSERT INTO effects VALUES (?1)", [m.id.to_string()])
            .map_err(outbox_sqlite::map_err)?;
        Ok(())
    };
    let inbox = FailFirstStart(
        table.consumer("billing", handler).unwrap(),
        std::sync::atomic::AtomicBool::new(false),
    );
    let source = KafkaSource::new(&cluster.bootstrap_servers(), "billing", &["invoices"]).unwrap();
    let mut consumer = Consumer::new(source, inbox).wait(Duration::from_secs(10));
    let e = consumer.run_once().await.unwrap_err();
    assert!(e.to_string().contains("database unreachable"), "{e}");

    // More messages arrive meanwhile; the next rounds take the kept batch, then those.
    let later: Vec<Envelope> = (3..5).map(|i| env("invoices", &i.to_string())).collect();
    let out = publisher
        .publish_batch(&later.iter().collect::<Vec<_>>())
        .await;
    assert!(out.iter().all(|r| r.is_ok()), "{out:?}");
    let mut processed = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while processed < 5 {
        assert!(
            std::time::Instant::now() < deadline,
            "{processed} of 5 processed"
        );
        processed += consumer.run_once().await.unwrap().processed;
    }
    let n: i64 = store
        .connect()
        .unwrap()
        .query_row("SELECT COUNT(DISTINCT msg) FROM effects", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 5, "the first batch was not skipped");
}
