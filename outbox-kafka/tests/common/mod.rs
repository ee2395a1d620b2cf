//! What the Kafka tests share: a real consumer reading a topic back, and a relay run through
//! a broker outage, for the mock cluster and for a real broker alike.
#![allow(dead_code)] // each test file uses its own part

use outbox_core::StoreAdmin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use outbox_core::conformance::{eventually, Deliveries, RunningRelay};
use outbox_core::{Event, KeepOrder, Message, Outbox, RecordingPublisher, Relay, RetryPolicy};
use outbox_kafka::KafkaPublisher;
use outbox_sqlite::SqliteStore;

use outbox_kafka::rdkafka::config::ClientConfig;
use outbox_kafka::rdkafka::consumer::{BaseConsumer, Consumer};
use outbox_kafka::rdkafka::message::{Headers, Message as _, OwnedMessage};

/// Read `topic` from the beginning until `n` distinct outbox ids were seen (duplicates are
/// allowed by at-least-once delivery), on a blocking thread.
pub async fn consume(bootstrap: String, topic: String, n: usize) -> Vec<OwnedMessage> {
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

pub fn header(m: &OwnedMessage, name: &str) -> Option<String> {
    let h = m.headers()?;
    h.iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Per-key order and ids of what a consumer read: the payload is the message's number.
pub fn deliveries(got: &[OwnedMessage]) -> Deliveries {
    let mut d = Deliveries::default();
    for m in got {
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
    d
}

/// What a relay run through an outage saw.
pub struct OutageReport {
    pub messages: usize,
    pub consumed: usize,
    pub deliveries: Deliveries,
    pub failed_attempts: usize,
    pub pending_during_outage: u64,
}

impl std::fmt::Display for OutageReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} messages, {} consumed, {} duplicates, {} failed attempts, {} pending during the outage",
            self.messages,
            self.consumed,
            self.deliveries.duplicates(),
            self.failed_attempts,
            self.pending_during_outage
        )
    }
}

impl OutageReport {
    pub fn assert_nothing_lost(&self) {
        assert_eq!(
            self.deliveries.distinct(),
            self.messages,
            "every message reached the topic"
        );
        assert!(
            self.pending_during_outage > 0,
            "the outage held messages back"
        );
        // Backoff, not a busy loop.
        assert!(
            self.failed_attempts <= 500,
            "too many failed attempts during the outage: {}",
            self.failed_attempts
        );
        assert!(
            self.deliveries.duplicates() <= 10,
            "at most one batch duplicated: {}",
            self.deliveries.duplicates()
        );
        assert_eq!(self.deliveries.order_violations(), 0, "keys out of order");
    }
}

/// 400 keep-order messages over 6 keys relayed to `topic` (created by the caller, 4
/// partitions); `down()` once 40 are sent, `up()` once publishes fail; then the topic is read
/// back from the start.
pub async fn relay_through_an_outage(
    bootstrap: &str,
    topic: &str,
    down: impl FnOnce(),
    up: impl FnOnce(),
) -> OutageReport {
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
                Message::new(topic, i.to_string().into_bytes()).key(format!("k{}", i % 6))
            })
            .collect();
        let after = outbox.enqueue_blocking(&mut tx, msgs).unwrap();
        tx.commit().unwrap();
        after.dispatch();
    }

    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
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
            if let Event::Failed { error, .. } = e {
                if f.fetch_add(1, Ordering::SeqCst).is_multiple_of(20) {
                    eprintln!("failed attempt: {error}");
                }
            }
        })
        .build()
        .unwrap();
    let running = RunningRelay::spawn(relay);

    eventually("some published", Duration::from_secs(30), || async {
        store.stats().await.unwrap().total().sent >= 40
    })
    .await;
    down();
    eventually(
        "publishes fail while the broker is down",
        Duration::from_secs(30),
        || async { failures.load(Ordering::SeqCst) > 0 },
    )
    .await;
    let pending_during_outage = store.stats().await.unwrap().total().pending;
    up();
    eventually(
        "backlog drained after the outage",
        Duration::from_secs(60),
        || async { store.stats().await.unwrap().total().pending == 0 },
    )
    .await;
    running.stop().await;

    // A key lives on one partition, and a partition is consumed in offset order.
    let got = consume(bootstrap.to_owned(), topic.to_owned(), n).await;
    OutageReport {
        messages: n,
        consumed: got.len(),
        deliveries: deliveries(&got),
        failed_attempts: failures.load(Ordering::SeqCst),
        pending_during_outage,
    }
}
