//! SQLite → Kafka relay.
//!
//! Shows: keyed messages relayed with an idempotent, acks=all producer; a consumer reads them
//! back and each key is on one partition, in order. With KAFKA_BOOTSTRAP set (a real broker:
//! `scripts/setup.sh` runs tansu on 127.0.0.1:9092) the topic is created with 3 partitions
//! if it is missing; without it, an in-process librdkafka mock cluster stands in, so the
//! example runs with no services. Exits non-zero if a message is missing or out of order.
//!
//! Run: `cargo run --example kafka_relay --features kafka`
//!  or: `KAFKA_BOOTSTRAP=127.0.0.1:9092 cargo run --example kafka_relay --features kafka`

use std::collections::HashMap;
use std::time::Duration;

use outbox::kafka::rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use outbox::kafka::rdkafka::client::DefaultClientContext;
use outbox::kafka::rdkafka::config::ClientConfig;
use outbox::kafka::rdkafka::consumer::{BaseConsumer, Consumer};
use outbox::kafka::rdkafka::message::{Headers, Message as _};
use outbox::kafka::rdkafka::mocking::MockCluster;
use outbox::kafka::rdkafka::types::RDKafkaErrorCode;
use outbox::kafka::KafkaPublisher;
use outbox::sqlite::SqliteStore;
use outbox::{KeepOrder, Message, Outbox};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let topic = "orders";
    let mock;
    let bootstrap = match std::env::var("KAFKA_BOOTSTRAP") {
        Ok(b) => {
            create_topic(&b, topic, 3).await?;
            println!("using the Kafka broker at {b}");
            b
        }
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

    // This run's messages carry its tag: a real broker's topic may hold earlier runs' too.
    let run = format!("{}-{}", std::process::id(), now_millis());
    let mut conn = store.connect()?;
    let mut tx = conn.transaction()?;
    let msgs = (0..9).map(|i| {
        Message::new(topic, format!("order {i}").into_bytes())
            .key(format!("customer-{}", i % 3))
            .header("example-run", run.clone())
    });
    let after = outbox.enqueue_blocking(&mut tx, msgs)?;
    tx.commit()?;
    after.dispatch();
    println!("relayed: {:?}", outbox.relay().build()?.run_once().await?);

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", format!("outbox-example-{run}"))
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[topic])?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut by_key: HashMap<String, Vec<(i32, String)>> = HashMap::new();
    let mut seen = 0;
    while seen < 9 && std::time::Instant::now() < deadline {
        let Some(m) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = m?;
        let ours = m.headers().is_some_and(|h| {
            h.iter()
                .any(|h| h.key == "example-run" && h.value == Some(run.as_bytes()))
        });
        if !ours {
            continue;
        }
        seen += 1;
        let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
        let value = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
        println!(
            "partition {} offset {} key {key} value {value}",
            m.partition(),
            m.offset()
        );
        by_key.entry(key).or_default().push((m.partition(), value));
    }
    if seen < 9 {
        return Err(format!("read {seen} of 9 messages back").into());
    }
    for (key, got) in &by_key {
        let values: Vec<&String> = got.iter().map(|g| &g.1).collect();
        let mut sorted = values.clone();
        sorted.sort();
        if values != sorted || got.iter().any(|g| g.0 != got[0].0) {
            return Err(format!("{key}: not in order on one partition: {got:?}").into());
        }
    }
    println!("every message read back; each key in order on one partition");
    Ok(())
}

/// Create `topic` unless it exists (tansu, like many managed clusters, does not create
/// topics on first use).
async fn create_topic(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
) -> Result<(), Box<dyn std::error::Error>> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(&[new], &options).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => return Err(format!("cannot create topic {t}: {e}").into()),
        }
    }
    Ok(())
}

fn now_millis() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default()
}
