//! Quickstart: SQLite + stdout, no services needed.
//!
//! Shows the whole flow: messages written in the same transaction as the business rows, a
//! rolled-back transaction that announces nothing, a publish-on-commit stream published right
//! after the commit, a deferred function call (jaiminho's `@save_to_outbox`), a keep-order
//! stream published by the relay in commit order, and the counts left in the table.
//!
//! Run: `cargo run --example quickstart`

use std::time::Duration;

use outbox::sqlite::SqliteStore;
use outbox::{
    Event, FunctionPublisher, KeepOrder, Outbox, PublishOnCommit, Router, StdoutPublisher,
};
use serde::Serialize;

#[derive(Serialize)]
struct OrderPlaced {
    order_id: i64,
    customer: String,
    total_cents: i64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("shop.db");
    let store = SqliteStore::open(&path)?;
    store.migrate_now()?;

    // One relay engine, many destinations: e-mails go to a registered function, everything
    // else to stdout (swap in Kafka, RabbitMQ or Redis with a feature).
    let functions =
        FunctionPublisher::new().register("send_receipt", |env: outbox::Envelope| async move {
            let args: serde_json::Value = serde_json::from_slice(&env.message.payload)?;
            println!("  function send_receipt({args}) ran for message {}", env.id);
            Ok(())
        });
    let publisher = Router::new()
        .stream("emails", functions)
        .fallback(StdoutPublisher::default());

    let outbox = Outbox::builder(store.clone(), publisher)
        .strategy(PublishOnCommit) // default for every stream...
        .stream_strategy("orders", KeepOrder::default()) // ...but orders keep their order
        .observer(|e: &Event<'_>| {
            if let Event::Failed {
                envelope, error, ..
            } = e
            {
                eprintln!("  publish of {} failed: {error}", envelope.id);
            }
        })
        .build()?;

    let mut conn = store.connect()?;
    conn.execute_batch(
        "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer TEXT, total_cents INTEGER)",
    )?;

    for (order_id, customer, total, commit) in [
        (1, "ada", 1250, true),
        (2, "bob", 990, false),
        (3, "cy", 4200, true),
    ] {
        let mut tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO orders VALUES (?1, ?2, ?3)",
            (order_id, customer, total),
        )?;
        let event = OrderPlaced {
            order_id,
            customer: customer.into(),
            total_cents: total,
        };
        let messages = [
            outbox
                .message("orders.placed", &event)?
                .stream("orders")
                .key(customer),
            outbox
                .call(
                    "send_receipt",
                    &serde_json::json!({ "order": order_id, "to": customer }),
                )?
                .stream("emails"),
        ];
        let after = outbox.enqueue_blocking(&mut tx, messages)?;
        if commit {
            tx.commit()?;
            println!("order {order_id}: committed; publishing on commit:");
            // In a service, `outbox::sqlite::commit(tx, after)` commits and publishes in the
            // background; here we await the outcome to print it.
            let report = after.publish().await;
            println!("  on-commit report: {report:?}");
        } else {
            drop(after);
            tx.rollback()?;
            println!("order {order_id}: rolled back; nothing stored, nothing published");
        }
    }

    println!("relay: publishing the keep-order stream in commit order:");
    let relay = outbox
        .relay()
        .poll_interval(Duration::from_millis(200))
        .build()?;
    let report = relay.run_once().await?;
    println!("  relay report: {report:?}");

    for s in outbox::StoreAdmin::stats(&store).await?.streams {
        println!(
            "stream {:<7} pending={} sent={} dead={}",
            s.stream, s.pending, s.sent, s.dead
        );
    }
    let orders: i64 = conn.query_row("SELECT COUNT(*) FROM orders", [], |r| r.get(0))?;
    println!("orders table: {orders} rows (order 2 was rolled back)");
    // Before a service exits: wait for publish-on-commit batches still in flight (those
    // started by `dispatch`), so none is cut off mid-publish.
    outbox.shutdown(Duration::from_secs(10)).await?;
    Ok(())
}
