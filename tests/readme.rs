//! Every Rust snippet of README.md compiles: each ```rust block of the README appears here
//! (or in an example) line for line, inside code the compiler checks, and
//! `every_readme_snippet_is_compiled_here` fails when a README block has no copy. The
//! functions are compiled, not run (they need a database or run forever); the examples and
//! the other tests run the same calls.
#![allow(dead_code, unused_variables, clippy::all)]

use std::error::Error as StdError;

type Res = Result<(), Box<dyn StdError>>;

/// The snippets, laid out as in the README (so rustfmt leaves them alone).
#[rustfmt::skip]
mod snippets {
    use super::*;

    #[derive(serde::Serialize)]
    struct OrderPlaced {
        id: i64,
    }

    async fn getting_started() -> Res {
        // step 2
        let store = outbox::sqlite::SqliteStore::open("app.db")?;   // table "outbox"
        store.migrate_now()?;

        // step 3
        use outbox::{KeepOrder, Outbox, PublishOnCommit, StdoutPublisher};
        let outbox = Outbox::builder(store.clone(), StdoutPublisher::default())
            .strategy(PublishOnCommit)                          // default of every stream
            .stream_strategy("orders", KeepOrder::default())    // per-stream override
            .build()?;

        // step 4
        let mut conn = store.connect()?;
        let mut tx = conn.transaction()?;
        tx.execute("INSERT INTO orders (id) VALUES (?1)", [42])?;
        let msg = outbox.message("orders.placed", &OrderPlaced { id: 42 })?   // JSON by default
            .stream("orders")
            .key("customer-7");                                              // ordering/partition key
        let after = outbox.enqueue_blocking(&mut tx, [msg])?;
        outbox::sqlite::commit(tx, after)?;   // commit, then publish-on-commit + wake relays

        // step 5
        let relay = outbox.relay().streams(["orders"]).batch_size(100).build()?;
        relay.run(async { tokio::signal::ctrl_c().await.ok(); }).await;   // loop, graceful stop
        // or relay.run_once().await? — publish until nothing is due (a cron job)

        let reminder = outbox.message("billing.reminder", &OrderPlaced { id: 42 })?
            .delay(std::time::Duration::from_secs(3600));     // or .deliver_at(system_time)

        // step 6
        outbox.shutdown(std::time::Duration::from_secs(10)).await?;   // on-commit publishes in flight
        outbox::Cleaner::new(store.clone()).run_once().await?;        // sent rows older than 7 days
        Ok(())
    }

    async fn writer_only(store: outbox::sqlite::SqliteStore) -> Res {
        use outbox::{KeepOrder, Outbox};
        let outbox = Outbox::writer(store.clone())     // no broker connection in this process
            .strategy(KeepOrder::default())             // relay-published, in order per key
            .build()?;
        // and, in the relay process: outbox.relay_with(publisher).build()?
        Ok(())
    }

    async fn parking(
        outbox: outbox::Outbox<outbox::sqlite::SqliteStore>,
        store: outbox::sqlite::SqliteStore,
    ) -> Res {
        use outbox::Store;
        outbox.park_unit("orders", "customer-7", "ledger migration").await?;   // any time
        for unit in store.parked_units(Some("orders"), 50).await? {              // oldest first
            println!("{} {} waits with {} messages: {:?}", unit.stream, unit.unit, unit.pending, unit.reason);
        }
        outbox.resume_unit("orders", "customer-7").await?;         // in order, from the head
        outbox.skip_head("orders", "customer-8").await?;           // dead-letter the head, resume the rest
        Ok(())
    }

    async fn postgres(msg: outbox::Message) -> Res {
        use outbox::postgres::{self, PgStore};
        use outbox::{Outbox, Store, StdoutPublisher};
        let store = PgStore::connect("postgres://app@db/shop").await?;   // table "outbox"
        store.migrate().await?;
        let outbox = Outbox::builder(store.clone(), StdoutPublisher::default()).build()?;
        let mut tx = store.pool().begin().await?;
        postgres::sqlx::query("UPDATE accounts SET ...").execute(&mut *tx).await?;
        let after = outbox.enqueue(&mut tx, [msg]).await?;   // takes the transaction, not a connection
        postgres::commit(tx, after).await?;
        Ok(())
    }

    /// Stands for the application's HTTP client in the README's publisher.
    struct HttpClient;

    impl HttpClient {
        async fn post(&self, url: String, idempotency_key: String, body: Vec<u8>) -> std::io::Result<u16> {
            let _ = (url, idempotency_key, body);
            Ok(200)
        }
    }

    struct Webhook { client: HttpClient, base: String }

    #[outbox::async_trait]
    impl outbox::Publisher for Webhook {
        async fn publish(&self, env: &outbox::Envelope) -> outbox::Result<()> {
            let url = format!("{}/{}", self.base, env.message.destination);
            let status = self.client.post(url, env.id.to_string(), env.message.payload.clone()).await
                .map_err(|e| outbox::Error::transient("webhook unreachable").with_source(e))?;
            match status {
                200..=299 => Ok(()),
                408 | 429 | 500..=599 => Err(outbox::Error::transient(format!("webhook {status}"))),
                _ => Err(outbox::Error::permanent(format!("webhook {status}"))),
            }
        }
    }

    fn observers(store: outbox::MemoryStore, publisher: outbox::StdoutPublisher) -> Res {
        use outbox::Outbox;
        let outbox = Outbox::builder(store, publisher)
            .observer(|e: &outbox::Event<'_>| if let outbox::Event::Published { envelope, .. } = e {
                println!("sent {}", envelope.id);
            })
            .build()?;
        Ok(())
    }
}

/// The README's ```rust blocks, each as its trimmed non-empty lines.
fn readme_blocks(readme: &str) -> Vec<Vec<String>> {
    let mut blocks = Vec::new();
    let mut current: Option<Vec<String>> = None;
    for line in readme.lines() {
        let t = line.trim();
        match &mut current {
            None if t.starts_with("```rust") => current = Some(Vec::new()),
            Some(b) if t == "```" => {
                blocks.push(std::mem::take(b));
                current = None;
            }
            Some(b) if !t.is_empty() => b.push(t.to_owned()),
            _ => {}
        }
    }
    blocks
}

#[test]
fn every_readme_snippet_is_compiled_here() {
    let readme = include_str!("../README.md");
    let mut compiled: Vec<String> = include_str!("readme.rs")
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect();
    for example in [
        include_str!("../examples/custom_publisher.rs"),
        include_str!("../examples/quickstart.rs"),
        include_str!("../examples/custom_strategy.rs"),
        include_str!("../examples/inbox_consumer.rs"),
    ] {
        compiled.extend(
            example
                .lines()
                .map(|l| l.trim().to_owned())
                .filter(|l| !l.is_empty()),
        );
    }
    let blocks = readme_blocks(readme);
    assert!(blocks.len() >= 8, "found only {} rust blocks", blocks.len());
    for block in blocks {
        let found = compiled
            .windows(block.len())
            .any(|w| w.iter().zip(&block).all(|(a, b)| a == b));
        assert!(
            found,
            "this README block is not in tests/readme.rs (so nothing compiles it):\n{}",
            block.join("\n")
        );
    }
}

/// The check itself finds a block that is missing.
#[test]
fn a_readme_block_without_a_copy_is_found() {
    let blocks = readme_blocks("text\n```rust\nlet x = 1;\n\nlet y = 2;\n```\n```sh\nls\n```\n");
    assert_eq!(
        blocks,
        vec![vec!["let x = 1;".to_owned(), "let y = 2;".to_owned()]]
    );
}
