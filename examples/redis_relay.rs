//! SQLite → Redis Streams relay.
//!
//! Shows: messages committed with business rows in SQLite, then relayed to a Redis stream
//! (`XADD`) with their id, key and headers as fields; the entries are read back with XRANGE.
//!
//! Run: `cargo run --example redis_relay --features redis`
//! (OUTBOX_REDIS_URL, default redis://127.0.0.1:6379/)

use outbox::redis::RedisPublisher;
use outbox::sqlite::SqliteStore;
use outbox::{KeepOrder, Message, Outbox};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url =
        std::env::var("OUTBOX_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::open(dir.path().join("app.db"))?;
    store.migrate_now()?;

    let stream_key = format!("outbox-example-{}", std::process::id());
    let publisher = RedisPublisher::connect(&url).await?.streams(Some(10_000)); // MAXLEN ~ 10000
    let outbox = Outbox::builder(store.clone(), publisher)
        .strategy(KeepOrder::default())
        .build()?;

    let mut conn = store.connect()?;
    conn.execute_batch("CREATE TABLE payments (id INTEGER PRIMARY KEY, cents INTEGER)")?;
    let mut tx = conn.transaction()?;
    let mut after = outbox::AfterCommit::empty();
    for (id, cents) in [(1, 500), (2, 1200), (3, 90)] {
        tx.execute("INSERT INTO payments VALUES (?1, ?2)", (id, cents))?;
        let msg = Message::json(
            &stream_key,
            &serde_json::json!({"payment": id, "cents": cents}),
        )?
        .key(format!("account-{}", id % 2))
        .header("schema", "payment.v1");
        after.merge(outbox.enqueue_blocking(&mut tx, [msg])?);
    }
    tx.commit()?;
    after.dispatch(); // keep-order: wakes relays in this process

    let report = outbox.relay().build()?.run_once().await?;
    println!("relayed: {report:?}");

    // Read back what a consumer sees.
    let mut redis = outbox::redis::redis::Client::open(url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let entries: outbox::redis::redis::streams::StreamRangeReply =
        outbox::redis::redis::AsyncCommands::xrange_all(&mut redis, &stream_key).await?;
    for e in &entries.ids {
        let field = |name: &str| e.get::<String>(name).unwrap_or_default();
        println!(
            "{stream_key} {} id={} key={} schema={} payload={}",
            e.id,
            field("id"),
            field("key"),
            field("h:schema"),
            field("payload")
        );
    }
    let _: () = outbox::redis::redis::AsyncCommands::del(&mut redis, &stream_key).await?;
    Ok(())
}
