//! A `Strategy` of the application's own: publish on commit, except the ledger, which keeps
//! order per tenant (a header) across keys, and blocks a tenant whose
//! entry cannot be delivered instead of skipping it. Also: a scheduled message.
//!
//! Shows: implementing `Strategy` (four answers per message: who publishes, the ordering
//! unit, what exhaustion does, when), registering it for a stream, what the store keeps (the
//! answers as plain columns), and the relay obeying them. Runs on SQLite with no services.
//!
//! Run: `cargo run --example custom_strategy`

use outbox::StoreAdmin;
use std::time::{Duration, Instant};

use outbox::sqlite::SqliteStore;
use outbox::{Exhausted, Message, Outbox, PublishedBy, RecordingPublisher, Store, Strategy, Unit};

/// Ledger entries keep order per tenant; everything else is published on commit.
#[derive(Debug)]
struct LedgerPerTenant;

impl Strategy for LedgerPerTenant {
    fn name(&self) -> &str {
        "ledger-per-tenant"
    }

    fn published_by(&self, m: &Message) -> PublishedBy {
        if m.destination.starts_with("ledger.") {
            PublishedBy::Relay
        } else {
            PublishedBy::Committer
        }
    }

    fn unit(&self, m: &Message) -> Unit {
        let ledger = m.destination.starts_with("ledger.");
        match (ledger, m.headers.get("tenant")) {
            (true, Some(tenant)) => Unit::Named(format!("tenant:{tenant}")),
            (true, None) => Unit::Stream,
            (false, _) => Unit::None,
        }
    }

    fn exhausted(&self, m: &Message) -> Exhausted {
        if m.destination.starts_with("ledger.") {
            Exhausted::Block // a missing ledger entry must not be skipped
        } else {
            Exhausted::DeadLetter
        }
    }
    // `schedule` keeps its default: what the message asks for (`delay`, `deliver_at`).
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::open(dir.path().join("app.db"))?;
    store.migrate().await?;
    let broker = RecordingPublisher::new();
    let outbox = Outbox::builder(store.clone(), broker.clone())
        .stream_strategy("billing", LedgerPerTenant)
        .build()?;

    let entry = |tenant: &str, invoice: &str, n: u32| -> outbox::Result<Message> {
        Ok(outbox
            .message(
                "ledger.entry",
                &serde_json::json!({ "tenant": tenant, "n": n }),
            )?
            .stream("billing")
            .key(invoice) // the broker's partition key; the unit is the tenant
            .header("tenant", tenant))
    };
    let msgs = vec![
        entry("acme", "inv-1", 1)?,
        entry("globex", "inv-9", 1)?,
        entry("acme", "inv-2", 2)?,
        outbox
            .message("billing.email", &serde_json::json!({ "to": "ops" }))?
            .stream("billing"),
        outbox
            .message(
                "billing.reminder",
                &serde_json::json!({ "invoice": "inv-1" }),
            )?
            .stream("billing")
            .delay(Duration::from_millis(300)), // published by the relay, not before then
    ];
    let mut conn = store.connect()?;
    let mut tx = conn.transaction()?;
    let after = outbox.enqueue_blocking(&mut tx, msgs)?;
    tx.commit()?;
    println!("publish-on-commit messages: {}", after.len());
    let report = after.publish().await; // or dispatch(): in the background
    println!("published on commit: {report:?}");

    // What the store keeps: the strategy's answers, per row.
    for seq in 1..=5 {
        if let Some(row) = store.get(seq).await? {
            println!(
                "seq {seq}: {:<16} order={:?} unit={:?} exhausted={:?}",
                row.envelope.message.destination, row.order, row.unit, row.exhausted
            );
        }
    }

    let relay = outbox.relay().build()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while broker.count() < 5 {
        relay.run_once().await?;
        assert!(Instant::now() < deadline, "not all published in time");
        store.wait_for_work(Duration::from_millis(50)).await;
    }
    let order: Vec<String> = broker
        .published()
        .iter()
        .map(|e| {
            let body: serde_json::Value = serde_json::from_slice(&e.message.payload).unwrap();
            format!("{} {body}", e.message.destination)
        })
        .collect();
    for line in &order {
        println!("published: {line}");
    }
    let pos = |needle: &str| order.iter().position(|l| l.contains(needle)).unwrap();
    assert!(pos(r#""n":1,"tenant":"acme""#) < pos(r#""n":2,"tenant":"acme""#));
    assert_eq!(
        pos("billing.reminder"),
        4,
        "the scheduled message comes last"
    );
    outbox.shutdown(Duration::from_secs(5)).await?;
    Ok(())
}
