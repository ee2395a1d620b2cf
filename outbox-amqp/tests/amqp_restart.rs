//! A RabbitMQ restart (`rabbitmqctl stop_app` / `start_app`) in the middle of a relay run
//! loses nothing. Its own test binary: cargo runs test binaries one at a time, so the restart
//! disturbs no other test.

use outbox_core::StoreAdmin;
use std::process::Command;
use std::time::Duration;

use lapin::options::{BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use outbox_amqp::AmqpPublisher;
use outbox_core::conformance::eventually;
use outbox_core::{KeepOrder, Message, Outbox, RecordingPublisher, Relay, RetryPolicy};
use outbox_sqlite::SqliteStore;

fn url() -> String {
    std::env::var("OUTBOX_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl must be installed");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A slow network: 100 ms per batch, so the restart lands in the middle of the run.
struct Slow(AmqpPublisher);

#[outbox_core::async_trait]
impl outbox_core::Publisher for Slow {
    async fn publish(&self, envelope: &outbox_core::Envelope) -> outbox_core::Result<()> {
        self.0.publish(envelope).await
    }
    async fn publish_batch(
        &self,
        batch: &[&outbox_core::Envelope],
    ) -> Vec<outbox_core::Result<()>> {
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.0.publish_batch(batch).await
    }
}

/// Starts the broker application again even if the test fails half-way.
struct Restart;

impl Drop for Restart {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").arg("start_app").output();
    }
}

async fn connect() -> Connection {
    Connection::connect(&url(), ConnectionProperties::default())
        .await
        .expect("RabbitMQ must be reachable")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_in_the_middle_of_a_relay_run_loses_nothing() {
    let q = format!("restart-{}", uuid::Uuid::now_v7().simple());
    let admin = connect().await;
    let ch = admin.create_channel().await.unwrap();
    ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    drop(ch);
    drop(admin);

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
                Message::new(q.clone(), i.to_string().into_bytes()).key(format!("k{}", i % 4))
            })
            .collect();
        let after = outbox.enqueue_blocking(&mut tx, msgs).unwrap();
        tx.commit().unwrap();
        after.dispatch();
    }

    let relay = Relay::builder(
        store.clone(),
        Slow(AmqpPublisher::connect(&url()).await.unwrap()),
    )
    .batch_size(10)
    .poll_interval(Duration::from_millis(20))
    .publish_timeout(Duration::from_secs(5))
    .retry(RetryPolicy {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(500),
        max_attempts: 100_000,
        ..Default::default()
    })
    .build()
    .unwrap();
    let running = outbox_core::conformance::RunningRelay::spawn(relay);

    eventually("some published", Duration::from_secs(30), || async {
        store.stats().await.unwrap().total().sent as usize >= 30
    })
    .await;
    let guard = Restart;
    rabbitmqctl(&["stop_app"]);
    let pending_during_outage = store.stats().await.unwrap().total().pending;
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);
    drop(guard);
    eventually(
        "backlog drained after the restart",
        Duration::from_secs(120),
        || async { store.stats().await.unwrap().total().pending == 0 },
    )
    .await;
    let report = running.stop().await;

    // Drain the durable queue: every id present, duplicates only around the restart.
    let admin = connect().await;
    let ch = admin.create_channel().await.unwrap();
    let mut d = outbox_core::conformance::Deliveries::default();
    while let Some(m) = ch
        .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let id = m
            .delivery
            .properties
            .message_id()
            .as_ref()
            .unwrap()
            .to_string();
        let i: usize = String::from_utf8(m.delivery.data.clone())
            .unwrap()
            .parse()
            .unwrap();
        d.record(id, format!("k{}", i % 4), i);
    }
    ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    let duplicates = d.duplicates();
    println!(
        "rabbitmq restart: {n} messages, {} delivered, {duplicates} duplicates, {} failed attempts, {pending_during_outage} pending during the outage",
        d.received(),
        report.failed
    );
    assert_eq!(d.distinct(), n, "every message reached the queue");
    assert!(pending_during_outage > 0, "the restart happened mid-run");
    // Backoff, not a busy loop.
    assert!(
        report.failed <= 500,
        "{} failed attempts during the restart",
        report.failed
    );
    assert!(
        duplicates <= 10,
        "at most one batch duplicated, got {duplicates}"
    );
    assert_eq!(d.order_violations(), 0, "keys out of order");
}
