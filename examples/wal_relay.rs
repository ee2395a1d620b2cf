//! The WAL relay: no outbox row on write. Each `enqueue` emits a transactional logical
//! message (`pg_logical_emit_message`) in the business transaction; a relay reads them from
//! a logical replication slot when the transaction commits and publishes them in commit
//! order. A rolled-back order announces nothing. Every other order sends its message with
//! the COMMIT instead (`wal::commit_with`: one round trip fewer for the writer).
//!
//! Needs `wal_level = logical` (`scripts/setup.sh` sets it on the local server) and a role
//! with `REPLICATION` for the relay.
//!
//! Run: `cargo run --example wal_relay --features pg-wal`
//! (OUTBOX_PG_URL, default postgres://postgres@127.0.0.1:5432/test)

use std::time::{Duration, Instant};

use outbox::postgres::wal::{WalRelay, WalStore};
use outbox::postgres::{self, PgOptions, PgStore};
use outbox::{KeepOrder, Outbox, RecordingPublisher};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("OUTBOX_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    // The table takes only dead letters and units the broker refused (none here).
    let table = PgStore::connect_with(
        &url,
        PgOptions {
            table: "outbox_wal_example".into(),
            ..Default::default()
        },
    )
    .await?;
    let store = WalStore::new(table, "outbox_example")?;
    // One slot per relay group; this example drops its own at the end (an abandoned slot
    // keeps WAL on the server's disk).
    let (slot, publication) = ("outbox_wal_example", "outbox_wal_example");
    store.setup(slot, publication).await?;
    postgres::sqlx::query(
        "CREATE TABLE IF NOT EXISTS example_orders (id BIGSERIAL PRIMARY KEY, customer TEXT)",
    )
    .execute(store.table().pool())
    .await?;

    // Writers: an outbox with no publisher (the WAL relay publishes everything).
    let outbox = Outbox::writer(store.clone())
        .strategy(KeepOrder::default())
        .build()?;
    let broker = RecordingPublisher::new();
    let relay = WalRelay::builder(&url, store.clone(), broker.clone())
        .slot(slot)
        .publication(publication)
        .build()?;
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(async move {
        let result = relay
            .run(async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            })
            .await;
        (result, relay.stats())
    });

    let mut committed = 0;
    for (i, customer) in ["ada", "bob", "ada", "cy", "ada", "bob"].iter().enumerate() {
        let started = Instant::now();
        let mut tx = store.table().pool().begin().await?;
        postgres::sqlx::query("INSERT INTO example_orders (customer) VALUES ($1)")
            .bind(customer)
            .execute(&mut *tx)
            .await?;
        let msg = outbox
            .message(
                "orders.placed",
                &serde_json::json!({"n": i, "customer": customer}),
            )?
            .key(*customer);
        let how = if i == 3 {
            let _ = outbox.enqueue(&mut tx, [msg]).await?;
            tx.rollback().await?; // never announced
            println!("  order {i} for {customer}: rolled back");
            continue;
        } else if i % 2 == 0 {
            // The message travels with the COMMIT: no round trip of its own.
            postgres::wal::commit_with(tx, &outbox, [msg]).await?;
            "commit_with"
        } else {
            let _ = outbox.enqueue(&mut tx, [msg]).await?;
            tx.commit().await?;
            "enqueue, commit"
        };
        committed += 1;
        while broker.count() < committed {
            if started.elapsed() > Duration::from_secs(30) {
                return Err("the WAL relay did not publish within 30 s (see its log)".into());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        println!(
            "  order {i} for {customer} ({how}): committed to published in {:?}",
            started.elapsed()
        );
    }
    stop_tx.send(true)?;
    let (result, stats) = running.await?;
    result?;
    println!("WAL relay stopped gracefully: {stats:?}");
    let published: Vec<String> = broker
        .published()
        .iter()
        .map(|e| String::from_utf8_lossy(&e.message.payload).into_owned())
        .collect();
    assert_eq!(published.len(), 5, "{published:?}");
    assert!(published.iter().all(|p| !p.contains("\"n\":3")));

    // The server frees the slot a moment after the relay's session ends.
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = postgres::sqlx::query("SELECT pg_drop_replication_slot($1)")
        .bind(slot)
        .execute(store.table().pool())
        .await
    {
        if Instant::now() > deadline {
            return Err(e.into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    postgres::sqlx::query(&format!("DROP PUBLICATION IF EXISTS {publication}"))
        .execute(store.table().pool())
        .await?;
    Ok(())
}
