//! SQLite → Kafka relay.
//!
//! Shows: keyed messages relayed with an idempotent, acks=all producer; each key lands on one
//! partition in order. Uses KAFKA_BOOTSTRAP when set (create the topic first), otherwise an
//! in-process librdkafka mock cluster, so it runs with no services.
//!
//! Run: `cargo run --example kafka_relay --features kafka`

use std::time::Duration;

use outbox::kafka::rdkafka::config::ClientConfig;
use outbox::kafka::rdkafka::consumer::{BaseConsumer, Consumer};
use outbox::kafka::rdkafka::message::Message as _;
use outbox::kafka::rdkafka::mocking::MockCluster;
use outbox::kafka::KafkaPublisher;
use outbox::sqlite::SqliteStore;
use outbox::{KeepOrder, Message, Outbox};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let topic = "orders";
    let mock;
    let bootstrap = match std::env::var("KAFKA_BOOTSTRAP") {
        Ok(b) => b,
        Err(_) => {
            mock = MockCluster::new(1)?;
            mock.create_topic(topic, 3, 1)?;
            println!(
                "using an in-process mock Kafka cluster at {}",
                mock.bootstrap_servers()
            );
            mock.bootstrap_servers()
        }
    };

    let dir = tempfile::tempdir()?;
    let store = SqliteStore::open(dir.path().join("app.db"))?;
    store.migrate_now()?;
    let outbox = Outbox::builder(store.clone(), KafkaPublisher::new(&bootstrap)?)
        .strategy(KeepOrder::default())
        .build()?;

    let mut conn = store.connect()?;
    let mut tx = conn.transaction()?;
    let msgs = (0..9).map(|i| {
        Message::new(topic, format!("order {i}").into_bytes()).key(format!("customer-{}", i % 3))
    });
    let after = outbox.enqueue_blocking(&mut tx, msgs)?;
    tx.commit()?;
    after.dispatch();
    println!("relayed: {:?}", outbox.relay().build()?.run_once().await?);

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", "outbox-example")
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[topic])?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut seen = 0;
    while seen < 9 && std::time::Instant::now() < deadline {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let m = m?;
            seen += 1;
            println!(
                "partition {} offset {} key {} value {}",
                m.partition(),
                m.offset(),
                String::from_utf8_lossy(m.key().unwrap_or_default()),
                String::from_utf8_lossy(m.payload().unwrap_or_default())
            );
        }
    }
    Ok(())
}
