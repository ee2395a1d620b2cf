//! Against a real Kafka-protocol broker: librdkafka's mock cluster (in-process, on
//! loopback), one cluster per test.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use outbox_core::conformance::eventually;
use outbox_core::{
    Envelope, ErrorKind, Event, KeepOrder, Message, MessageId, Outbox, Publisher,
    RecordingPublisher, Relay, RetryPolicy, Store,
};
use outbox_kafka::rdkafka::config::ClientConfig;
use outbox_kafka::rdkafka::consumer::{BaseConsumer, Consumer};
use outbox_kafka::rdkafka::message::{Headers, Message as _, OwnedMessage};
use outbox_kafka::rdkafka::mocking::MockCluster;
use outbox_kafka::KafkaPublisher;
use outbox_sqlite::SqliteStore;

fn env(topic: &str, payload: &str) -> Envelope {
    Envelope {
        id: MessageId::new(),
        created_at: std::time::SystemTime::now(),
        message: Message::new(topic, payload.as_bytes().to_vec()),
    }
}

/// Read `topic` from the beginning until `n` distinct outbox ids were seen (duplicates are
/// allowed by at-least-once delivery), on a blocking thread.
async fn consume(bootstrap: String, topic: String, n: usize) -> Vec<OwnedMessage> {
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set(
                "group.id",
                format!("test-{}", uuid::Uuid::now_v7().simple()),
            )
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        consumer.subscribe(&[&topic]).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut out: Vec<OwnedMessage> = Vec::new();
        let mut ids = std::collections::HashSet::new();
        while ids.len() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "consumed {} of {n} messages",
                ids.len()
            );
            if let Some(m) = consumer.poll(Duration::from_millis(100)) {
                let m = m.unwrap().detach();
                ids.insert(header(&m, "outbox-id"));
                out.push(m);
            }
        }
        out
    })
    .await
    .unwrap()
}

fn header(m: &OwnedMessage, name: &str) -> Option<String> {
    let h = m.headers()?;
    h.iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_in_the_middle_of_a_relay_run_loses_nothing() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("events", 4, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("o.db")).unwrap();
    store.migrate_now().unwrap();
    let outbox = Outbox::builder(store.clone(), RecordingPublisher::new())
        .strategy(KeepOrder::default())
        .build()
        .unwrap();
    let n = 400usize;
    let mut conn = store.connect().unwrap();
    for chunk in 0..8 {
        let mut tx = conn.transaction().unwrap();
        let msgs: Vec<Message> = (0..n / 8)
            .map(|i| {
                let i = chunk * (n / 8) + i;
                Message::new("events", i.to_string().into_bytes()).key(format!("k{}", i % 6))
            })
            .collect();
        let after = outbox.enqueue_blocking(&mut tx, msgs).unwrap();
        tx.commit().unwrap();
        after.dispatch();
    }

    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .set("message.timeout.ms", "1500");
    let failures = Arc::new(AtomicUsize::new(0));
    let f = failures.clone();
    let relay = Relay::builder(store.clone(), KafkaPublisher::from_config(config).unwrap())
        .batch_size(10)
        .poll_interval(Duration::from_millis(20))
        .publish_timeout(Duration::from_secs(5))
        .retry(RetryPolicy {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(300),
            max_attempts: 100_000,
            ..Default::default()
        })
        .observer(move |e: &Event<'_>| {
            if matches!(e, Event::Failed { .. }) {
                f.fetch_add(1, Ordering::SeqCst);
            }
        })
        .build()
        .unwrap();
    let running = outbox_core::conformance::RunningRelay::spawn(relay);

    eventually("some published", Duration::from_secs(30), || async {
        store.stats().await.unwrap().total().sent >= 40
    })
    .await;
    cluster.broker_down(1).unwrap();
    eventually(
        "publishes fail while the broker is down",
        Duration::from_secs(30),
        || async { failures.load(Ordering::SeqCst) > 0 },
    )
    .await;
    let pending_during_outage = store.stats().await.unwrap().total().pending;
    cluster.broker_up(1).unwrap();
    eventually(
        "backlog drained after the outage",
        Duration::from_secs(60),
        || async { store.stats().await.unwrap().total().pending == 0 },
    )
    .await;
    running.stop().await;

    let got = consume(cluster.bootstrap_servers(), "events".into(), n).await;
    // A key lives on one partition, and a partition is consumed in offset order.
    let mut d = outbox_core::conformance::Deliveries::default();
    for m in &got {
        let i: usize = std::str::from_utf8(m.payload().unwrap())
            .unwrap()
            .parse()
            .unwrap();
        d.record(
            header(m, "outbox-id").unwrap(),
            String::from_utf8(m.key().unwrap().to_vec()).unwrap(),
            i,
        );
    }
    println!(
        "kafka outage: {n} messages, {} consumed, {} duplicates, {} failed attempts, {pending_during_outage} pending during the outage",
        got.len(),
        d.duplicates(),
        failures.load(Ordering::SeqCst)
    );
    assert_eq!(d.distinct(), n, "every message reached the topic");
    assert!(pending_during_outage > 0);
    // Backoff, not a busy loop.
    assert!(
        failures.load(Ordering::SeqCst) <= 500,
        "too many failed attempts during the outage"
    );
    assert!(d.duplicates() <= 10, "at most one batch duplicated");
    assert_eq!(d.order_violations(), 0, "keys out of order");
}
