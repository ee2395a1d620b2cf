//! Every Rust snippet of README.md compiles: each ```rust block of the README appears here
//! (or in an example) line for line, inside code the compiler checks, and
//! `every_readme_snippet_is_compiled_here` fails when a README block has no copy. The
//! functions are compiled, not run (they need a database or run forever); the examples and
//! the other tests run the same calls.
//!
//! The Getting started projects (the blocks after a `<!-- project: NAME FILE -->` marker) are
//! not snippets: `the_getting_started_projects_run_as_written` writes each project's files
//! exactly as the README has them into a new folder next to a link to this checkout, and
//! builds and runs it with cargo.
#![allow(dead_code, unused_variables, clippy::all)]

use outbox::StoreAdmin;
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

    async fn any_store(database_url: String, msg: outbox::Message) -> Res {
        use outbox::any::AnyStore;
        use outbox::{Outbox, Store, StdoutPublisher};
        let store = AnyStore::connect(&database_url).await?;   // sqlite://…, postgres://…, mysql://…
        store.migrate().await?;
        let outbox = Outbox::builder(store.clone(), StdoutPublisher::default()).build()?;
        let mut tx = store.begin().await?;
        tx.execute("INSERT INTO orders (id, total) VALUES (?, ?)", &[42.into(), 9.5.into()]).await?;
        let after = outbox.enqueue(&mut tx, [msg]).await?;
        tx.commit(after).await?;                                  // then publish-on-commit messages go out
        Ok(())
    }

    async fn wal_relay(
        url: &str,
        msg: outbox::Message,
        publisher: outbox::StdoutPublisher,
        shutdown: std::future::Pending<()>,
    ) -> Res {
        use outbox::postgres::PgStore;
        use outbox::{KeepOrder, Outbox};
        use outbox::postgres::wal::{WalRelay, WalStore};
        let table = PgStore::connect(url).await?;            // dead letters and refused units go here
        let store = WalStore::new(table, "outbox")?;         // the logical-message prefix
        store.setup("outbox", "outbox").await?;              // table, publication, slot (idempotent)
        let outbox = Outbox::writer(store.clone()).strategy(KeepOrder::default()).build()?;
        let mut tx = store.table().pool().begin().await?;
        let _ = outbox.enqueue(&mut tx, [msg]).await?;       // the same call as for PgStore
        tx.commit().await?;
        WalRelay::builder(url, store, publisher).slot("outbox").publication("outbox").build()?
            .run(shutdown).await?;
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

/// The README's ```rust blocks, each as its trimmed non-empty lines (not the projects' files).
fn readme_blocks(readme: &str) -> Vec<Vec<String>> {
    let mut blocks = Vec::new();
    // A block being read: its lines, and whether it is kept (a rust block, not a project's).
    let mut current: Option<(Vec<String>, bool)> = None;
    let mut project_file = false;
    for line in readme.lines() {
        let t = line.trim();
        match &mut current {
            None if t.starts_with("<!-- project:") => project_file = true,
            None if t.starts_with("```") => {
                current = Some((Vec::new(), t.starts_with("```rust") && !project_file));
                project_file = false;
            }
            Some((b, keep)) if t == "```" => {
                if *keep {
                    blocks.push(std::mem::take(b));
                }
                current = None;
            }
            Some((b, _)) if !t.is_empty() => b.push(t.to_owned()),
            _ => {}
        }
    }
    blocks
}

/// The file a `<!-- project: NAME FILE -->` marker names: the fenced block after it, verbatim.
fn project_file(readme: &str, name: &str, file: &str) -> String {
    let marker = format!("<!-- project: {name} {file} -->");
    let after = readme
        .split_once(&marker)
        .unwrap_or_else(|| panic!("no {marker} in the README"))
        .1;
    let body = after
        .split_once("```")
        .and_then(|(_, rest)| rest.split_once('\n'))
        .map(|(_, rest)| rest)
        .unwrap();
    let end = body.find("\n```").unwrap();
    format!("{}\n", &body[..end])
}

/// The Getting started projects, built and run as the README has them: a new folder holding
/// exactly its `Cargo.toml` and `src/main.rs`, next to `outbox` (a link to this checkout), as
/// the README tells a new user to lay them out. Cargo.lock is this workspace's (so the same
/// versions); crates the workspace never downloads (those it patches, which a project without
/// the `[patch]` takes from crates.io) are fetched as a new user's `cargo run` would, so the
/// test does not depend on what a machine happens to have cached. The build goes to a target
/// folder of its own (the tests' is locked while they run).
#[test]
fn the_getting_started_projects_run_as_written() {
    let readme = include_str!("../README.md");
    let checkout = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    // The PostgreSQL project gets a database of its own (its table is the default "outbox").
    let server = std::env::var("OUTBOX_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let database = format!("readme_{}", uuid::Uuid::now_v7().simple());
    let admin = |sql: String| {
        let server = server.clone();
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(async move {
                use outbox::postgres::sqlx::{self, Connection};
                let mut c = sqlx::PgConnection::connect(&server).await.unwrap();
                sqlx::query(&sql).execute(&mut c).await.unwrap();
            })
    };
    admin(format!("CREATE DATABASE {database}"));
    let (base, _) = server.rsplit_once('/').unwrap();
    let pg = format!("{base}/{database}");
    for (name, env) in [("sqlite", vec![]), ("postgres", vec![("DATABASE_URL", pg)])] {
        let root = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(checkout, root.path().join("outbox")).unwrap();
        let project = root.path().join("shop");
        std::fs::create_dir_all(project.join("src")).unwrap();
        std::fs::write(
            project.join("Cargo.toml"),
            project_file(readme, name, "Cargo.toml"),
        )
        .unwrap();
        std::fs::write(
            project.join("src/main.rs"),
            project_file(readme, name, "src/main.rs"),
        )
        .unwrap();
        std::fs::copy(checkout.join("Cargo.lock"), project.join("Cargo.lock")).unwrap();
        let out =
            std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .args(["run", "--quiet"])
                .current_dir(&project)
                .env("CARGO_TARGET_DIR", checkout.join("target/readme-projects"))
                .envs(env)
                .output()
                .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {stdout}\n{stderr}");
        assert!(stdout.contains("orders.placed"), "{name}: {stdout}");
        assert!(stdout.contains("relay published 1"), "{name}: {stdout}");
        if name == "sqlite" {
            // The mistake a new user makes first: `enqueue(...).await` with SQLite's
            // transaction. The compiler's message says what to call instead.
            std::fs::create_dir_all(project.join("src/bin")).unwrap();
            std::fs::write(
                project.join("src/bin/wrong.rs"),
                "#[tokio::main]\nasync fn main() -> Result<(), Box<dyn std::error::Error>> {\n\
                 let store = outbox::sqlite::SqliteStore::open(\"shop.db\")?;\n\
                 let outbox = outbox::Outbox::writer(store.clone()).build()?;\n\
                 let mut conn = store.connect()?;\n\
                 let mut tx = conn.transaction()?;\n\
                 let after = outbox.enqueue(&mut tx, [outbox::Message::new(\"d\", vec![1])]).await?;\n\
                 Ok(())\n}\n",
            )
            .unwrap();
            let out = std::process::Command::new(
                std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()),
            )
            .args(["build", "--offline", "--quiet", "--bin", "wrong"])
            .current_dir(&project)
            .env("CARGO_TARGET_DIR", checkout.join("target/readme-projects"))
            .output()
            .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success(),
                "enqueue(...).await compiled on SQLite"
            );
            assert!(
                stderr.contains("call `outbox.enqueue_blocking(&mut tx, messages)` instead"),
                "{stderr}"
            );
        }
    }
    admin(format!("DROP DATABASE {database} WITH (FORCE)"));
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

/// The crate's front page lists every feature of Cargo.toml (it listed 6 of 11).
#[test]
fn the_crate_docs_list_every_feature() {
    let manifest = include_str!("../Cargo.toml");
    let docs = include_str!("../src/lib.rs");
    let features = manifest
        .split_once("\n[features]\n")
        .unwrap()
        .1
        .split("\n[")
        .next()
        .unwrap();
    let names: Vec<&str> = features
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains(" = "))
        .map(|l| l.split(" = ").next().unwrap().trim())
        .filter(|n| *n != "default")
        .collect();
    assert!(names.len() >= 11, "{names:?}");
    for name in names {
        assert!(
            docs.contains(&format!("//! | `{name}`")),
            "feature {name} is not in the table of src/lib.rs"
        );
    }
}

/// The check itself finds a block that is missing.
#[test]
fn a_readme_block_without_a_copy_is_found() {
    let blocks = readme_blocks(
        "text\n```rust\nlet x = 1;\n\nlet y = 2;\n```\n```sh\nls\n```\n<!-- project: a src/main.rs -->\n```rust\nfn main() {}\n```\n",
    );
    assert_eq!(
        blocks,
        vec![vec!["let x = 1;".to_owned(), "let y = 2;".to_owned()]]
    );
}
