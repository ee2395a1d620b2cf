//! PostgreSQL relay: enqueue in a sqlx transaction, relay with LISTEN/NOTIFY wake-up.
//!
//! Shows: the table created by `migrate`, orders and their messages committed together, a
//! relay that sleeps on a long poll interval yet publishes each commit within milliseconds
//! (NOTIFY), per-customer ordering, and a graceful stop.
//!
//! Run: `cargo run --example postgres_relay --features postgres`
//! (OUTBOX_PG_URL, default postgres://postgres@127.0.0.1:5432/test)

use outbox::StoreAdmin;
use std::time::{Duration, Instant};

use outbox::postgres::{self, PgOptions, PgStore};
use outbox::{KeepOrder, Outbox, RecordingPublisher, Relay, StdoutPublisher, Store};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("OUTBOX_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let options = PgOptions {
        table: "outbox_example".into(),
        ..Default::default()
    };
    let store = PgStore::connect_with(&url, options).await?;
    store.migrate().await?;
    postgres::sqlx::query(
        "CREATE TABLE IF NOT EXISTS example_orders (id BIGSERIAL PRIMARY KEY, customer TEXT)",
    )
    .execute(store.pool())
    .await?;

    // The application side only writes; a relay in another process (here: its own pool)
    // publishes. RecordingPublisher stands in: the app never publishes keep-order streams.
    let outbox = Outbox::builder(store.clone(), RecordingPublisher::new())
        .strategy(KeepOrder::default())
        .build()?;
    let relay_store = store.reopen().await?;
    let relay = Relay::builder(relay_store, StdoutPublisher::default())
        .poll_interval(Duration::from_secs(60))
        .build()?;
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(async move {
        relay
            .run(async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await; // the relay is now idle, listening

    for (i, customer) in ["ada", "bob", "ada", "cy", "ada"].iter().enumerate() {
        let started = Instant::now();
        let mut tx = store.pool().begin().await?;
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
        let after = outbox.enqueue(&mut tx, [msg]).await?;
        postgres::commit(tx, after).await?;
        // Wait until the relay (60 s poll interval) has published it: NOTIFY woke it.
        while store.stats().await?.total().pending > 0 {
            if started.elapsed() > Duration::from_secs(30) {
                return Err("the relay did not publish within 30 s (see its log)".into());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        println!(
            "  order {i} for {customer}: committed to published in {:?}",
            started.elapsed()
        );
    }
    stop_tx.send(true)?;
    let report = running.await?;
    println!("relay stopped gracefully: {report:?}");
    let t = store.stats().await?.total();
    println!(
        "table outbox_example: pending={} sent={} dead={}",
        t.pending, t.sent, t.dead
    );
    // The cleaner keeps sent rows 7 days by default; this demo keeps none.
    let deleted = outbox::Cleaner::new(store.clone())
        .retention(Duration::ZERO)
        .run_once()
        .await?;
    println!("cleaner deleted {deleted} sent rows");
    Ok(())
}
