//! Both halves of the pattern, end to end: exactly-once *effects* over at-least-once delivery.
//!
//! Shows: a shop commits an order and its `orders.placed` message in one transaction
//! (outbox); a relay publishes it to Kafka; a billing service consumes it with an inbox, so
//! the invoice and the inbox mark commit in one transaction of the billing database. The
//! relay then publishes every message a second time (as after a crash between publishing and
//! recording it): the consumer recognises them and no invoice is written twice. An
//! in-process librdkafka mock cluster stands in for Kafka, so it runs with no services.
//!
//! Run: `cargo run --example inbox_consumer --features kafka`

use std::time::Duration;

use outbox::kafka::rdkafka::mocking::MockCluster;
use outbox::kafka::{KafkaPublisher, KafkaSource};
use outbox::sqlite::rusqlite::Transaction;
use outbox::sqlite::SqliteStore;
use outbox::StoreAdmin;
use outbox::{
    Consumer, ConsumerReport, Error, KeepOrder, Message, Outbox, Publisher, Received, Retry,
};

#[derive(serde::Serialize, serde::Deserialize)]
struct OrderPlaced {
    order: i64,
    cents: i64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cluster = MockCluster::new(1)?;
    cluster.create_topic("orders.placed", 2, 1)?;
    let bootstrap = cluster.bootstrap_servers();
    let dir = tempfile::tempdir()?;

    // --- The shop: orders and the outbox in one database.
    let shop = SqliteStore::open(dir.path().join("shop.db"))?;
    shop.migrate_now()?;
    let publisher = KafkaPublisher::new(&bootstrap)?;
    let outbox = Outbox::builder(shop.clone(), KafkaPublisher::new(&bootstrap)?)
        .strategy(KeepOrder::default())
        .build()?;
    let mut conn = shop.connect()?;
    conn.execute_batch("CREATE TABLE orders (id INTEGER PRIMARY KEY, cents INTEGER NOT NULL)")?;
    for (order, cents) in [(1, 1250), (2, 990), (3, 4000)] {
        let mut tx = conn.transaction()?;
        tx.execute("INSERT INTO orders VALUES (?1, ?2)", (order, cents))?;
        let after = outbox.enqueue_blocking(
            &mut tx,
            [
                Message::json("orders.placed", &OrderPlaced { order, cents })?
                    .key(format!("order-{order}")),
            ],
        )?;
        tx.commit()?;
        after.dispatch();
    }
    let report = outbox.relay().build()?.run_once().await?;
    println!("relay: published {}", report.published);
    // A relay that crashed after publishing, before recording it, publishes again: the same
    // ids, a second time.
    let again: Vec<outbox::Envelope> = shop
        .messages(&outbox::MessageFilter {
            limit: 100,
            ..Default::default()
        })
        .await?
        .into_iter()
        .map(|m| m.envelope)
        .collect();
    let results = publisher
        .publish_batch(&again.iter().collect::<Vec<_>>())
        .await;
    println!(
        "published all {} again (duplicates)",
        results.iter().filter(|r| r.is_ok()).count()
    );

    // --- Billing: invoices and the inbox in its own database.
    let billing = SqliteStore::open(dir.path().join("billing.db"))?;
    billing.connect()?.execute_batch(
        "CREATE TABLE invoices (order_id INTEGER NOT NULL, cents INTEGER NOT NULL)",
    )?;
    let inbox_table = billing.inbox_table("inbox")?;
    inbox_table.migrate_now()?;
    let inbox = inbox_table.consumer("billing", |tx: &Transaction<'_>, m: &Received| {
        let order: OrderPlaced = m.json()?; // not JSON: a dead letter at once
        if order.cents <= 0 {
            return Err(Error::handler(
                Retry::Permanent,
                "an order without an amount",
            ));
        }
        tx.execute(
            "INSERT INTO invoices VALUES (?1, ?2)",
            (order.order, order.cents),
        )
        .map_err(outbox::sqlite::map_err)?;
        Ok(())
    })?;
    let source = KafkaSource::new(&bootstrap, "billing", &["orders.placed"])?;
    let mut consumer = Consumer::new(source, inbox).wait(Duration::from_secs(2));
    let mut total = ConsumerReport::default();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while total.processed + total.duplicates < 6 {
        if std::time::Instant::now() > deadline {
            return Err(format!("consumed only {total:?}").into());
        }
        total += consumer.run_once().await?;
    }
    println!(
        "consumer: {} processed, {} duplicates recognised, {} dead letters",
        total.processed, total.duplicates, total.dead_lettered
    );
    let conn = billing.connect()?;
    let mut stmt = conn.prepare("SELECT order_id, cents FROM invoices ORDER BY order_id")?;
    let invoices: Vec<(i64, i64)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    for (order, cents) in &invoices {
        println!("invoice for order {order}: {cents} cents");
    }
    if invoices.len() != 3 {
        return Err(format!("expected 3 invoices, found {}", invoices.len()).into());
    }
    println!("every order invoiced exactly once");
    Ok(())
}
