//! A database per tenant, one relay process for all of them: each tenant's store is chosen
//! by URL at run time (`AnyStore`), the application writes through one code path whatever the
//! database, and one `Fleet` relays every tenant in turn.
//!
//! Runs with no services (three SQLite files); set `TENANT_URLS` to a comma-separated list
//! (`postgres://…,mysql://…,sqlite://…`) to use other databases.
//!
//!   cargo run --example many_databases --features any

use std::sync::Arc;
use std::time::Duration;

use outbox::any::AnyStore;
use outbox::{Fleet, KeepOrder, Message, Outbox, RecordingPublisher, RelayConfig, Store};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let urls: Vec<String> = match std::env::var("TENANT_URLS") {
        Ok(list) => list.split(',').map(str::to_owned).collect(),
        Err(_) => (1..=3)
            .map(|i| {
                format!(
                    "sqlite://{}",
                    dir.path().join(format!("tenant{i}.db")).display()
                )
            })
            .collect(),
    };
    let broker = RecordingPublisher::new(); // or Kafka, RabbitMQ, Redis, NATS, a webhook
    let fleet = Fleet::builder(broker.clone())
        .config(RelayConfig {
            poll_interval: Duration::from_millis(100),
            ..Default::default()
        })
        .max_batches(4)
        .build()?;

    for (i, url) in urls.iter().enumerate() {
        let tenant = format!("tenant{}", i + 1);
        let store = AnyStore::connect(url).await?;
        store.migrate().await?;
        fleet.add(&tenant, Arc::new(store.clone()))?;

        // The application's write: the same code on every database.
        let outbox = Outbox::writer(store.clone())
            .strategy(KeepOrder::default())
            .build()?;
        let mut tx = store.begin().await?;
        let msgs = (0..5).map(|n| {
            Message::new(
                "orders.placed",
                format!(r#"{{"tenant":"{tenant}","n":{n}}}"#),
            )
            .key("customer-7")
        });
        let after = outbox.enqueue(&mut tx, msgs).await?;
        tx.commit(after).await?;
    }

    let expected = urls.len() * 5;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while broker.count() < expected {
        if std::time::Instant::now() > deadline {
            return Err(format!("{} of {expected} published in 30 s", broker.count()).into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for s in fleet.status() {
        println!(
            "{}: {} published ({})",
            s.name,
            s.published,
            s.state.as_str()
        );
    }
    fleet.shutdown().await;
    Ok(())
}
