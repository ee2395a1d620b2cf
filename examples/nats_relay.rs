//! SQLite → NATS JetStream relay.
//!
//! Shows: messages committed with business rows in SQLite, then relayed to a JetStream stream
//! with `Nats-Msg-Id` set to the message id, so that publishing a message twice (a relay that
//! crashed after the broker took it) stores it once; the stream is read back.
//!
//! Run: `cargo run --example nats_relay --features nats`
//! (OUTBOX_NATS_URL, default nats://127.0.0.1:4222, a server with JetStream on: `-js`)

use outbox::nats::NatsPublisher;
use outbox::sqlite::SqliteStore;
use outbox::StoreAdmin;
use outbox::{KeepOrder, Message, Outbox, Publisher};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("OUTBOX_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::open(dir.path().join("app.db"))?;
    store.migrate_now()?;

    let publisher = NatsPublisher::connect(&url).await?;
    // The stream that takes the subjects (an operator's job in production).
    let name = format!("outbox_example_{}", std::process::id());
    let mut stream = publisher
        .jetstream()
        .create_stream(outbox::nats::async_nats::jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![format!("{name}.>")],
            duplicate_window: std::time::Duration::from_secs(120),
            ..Default::default()
        })
        .await?;
    let outbox = Outbox::builder(store.clone(), publisher.clone())
        .strategy(KeepOrder::default())
        .build()?;

    let mut conn = store.connect()?;
    conn.execute_batch("CREATE TABLE payments (id INTEGER PRIMARY KEY, cents INTEGER)")?;
    let mut tx = conn.transaction()?;
    let mut after = outbox::AfterCommit::empty();
    for (id, cents) in [(1, 500), (2, 1200), (3, 90)] {
        tx.execute("INSERT INTO payments VALUES (?1, ?2)", (id, cents))?;
        let msg = Message::json(
            format!("{name}.payments"),
            &serde_json::json!({"payment": id, "cents": cents}),
        )?
        .key(format!("account-{}", id % 2));
        after.merge(outbox.enqueue_blocking(&mut tx, [msg])?);
    }
    tx.commit()?;
    after.dispatch();

    let report = outbox.relay().build()?.run_once().await?;
    println!("relayed: {report:?}");

    // The same message again (as after a relay crash): JetStream keeps one copy.
    let first = store_first(&store).await?;
    publisher.publish(&first).await?;

    let count = stream.info().await?.state.messages;
    for seq in 1..=count {
        let m = stream.get_raw_message(seq).await?;
        let h = |n: &str| {
            m.headers
                .get(n)
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default()
        };
        println!(
            "{} #{seq} id={} key={} payload={}",
            m.subject,
            h("Nats-Msg-Id"),
            h("outbox-key"),
            String::from_utf8_lossy(&m.payload)
        );
    }
    assert_eq!(count, 3, "the re-published message was stored once");
    publisher.jetstream().delete_stream(&name).await?;
    Ok(())
}

/// The first message, as the relay published it.
async fn store_first(store: &SqliteStore) -> outbox::Result<outbox::Envelope> {
    Ok(store.get(1).await?.expect("row 1").envelope)
}
