//! SQLite → RabbitMQ relay with publisher confirms.
//!
//! Shows: a queue declared, messages committed in SQLite and relayed to RabbitMQ (persistent,
//! confirmed, `message_id` = outbox id), then fetched back; and an unroutable message that
//! the broker returns, which ends up dead-lettered in the outbox instead of vanishing.
//!
//! Run: `cargo run --example rabbitmq_relay --features amqp`
//! (OUTBOX_AMQP_URL, default amqp://guest:guest@127.0.0.1:5672/%2f)

use outbox::StoreAdmin;
use std::time::Duration;

use outbox::amqp::lapin::options::{BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions};
use outbox::amqp::lapin::types::FieldTable;
use outbox::amqp::AmqpPublisher;
use outbox::sqlite::SqliteStore;
use outbox::{Message, Outbox};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("OUTBOX_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let queue = format!("outbox-example-{}", std::process::id());
    let admin = outbox::amqp::lapin::Connection::connect(
        &url,
        outbox::amqp::lapin::ConnectionProperties::default(),
    )
    .await?;
    let channel = admin.create_channel().await?;
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;

    let dir = tempfile::tempdir()?;
    let store = SqliteStore::open(dir.path().join("app.db"))?;
    store.migrate_now()?;
    let outbox = Outbox::builder(store.clone(), AmqpPublisher::connect(&url).await?).build()?;

    let mut conn = store.connect()?;
    let mut tx = conn.transaction()?;
    let after = outbox.enqueue_blocking(
        &mut tx,
        [
            Message::json(&queue, &serde_json::json!({"event": "signup", "user": 7}))?, // default exchange → queue
            Message::json(
                "no-queue-is-bound-to-this",
                &serde_json::json!({"oops": true}),
            )?,
        ],
    )?;
    // As a service does: commit, publish in the background, and before exiting wait for what
    // is still in flight (Outbox::shutdown).
    outbox::sqlite::commit(tx, after)?;
    outbox.shutdown(Duration::from_secs(10)).await?;
    println!("published on commit, shutdown clean");

    while let Some(m) = channel
        .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
        .await?
    {
        let id = m
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default();
        println!(
            "queue {queue}: message_id={id} body={}",
            String::from_utf8_lossy(&m.delivery.data)
        );
    }
    for dead in store.dead_letters(None, 10).await? {
        println!(
            "dead letter: destination={} error={}",
            dead.envelope.message.destination,
            dead.last_error.unwrap_or_default()
        );
    }
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    Ok(())
}
