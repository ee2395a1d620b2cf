//! The operators' side of the inbox through the `outbox` binary, on SQLite and PostgreSQL:
//! `migrate --inbox`, `inbox dead`, `inbox requeue` (bad ids and non-dead letters are clear
//! errors), and `clean --inbox` keeping marks younger than the horizon.

use std::process::{Command, Output};
use std::sync::Arc;

use outbox_core::{Inbox, InboxAdmin, MessageId, Received};
use serde_json::Value;

fn run(args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_outbox"));
    for (var, _) in std::env::vars() {
        if var.starts_with("OUTBOX_") {
            c.env_remove(var);
        }
    }
    c.args(args).output().unwrap()
}

fn json(args: &[&str]) -> Value {
    let out = run(args);
    assert!(
        out.status.success(),
        "outbox {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Two processed messages and one dead letter for consumer "billing".
async fn fill(table: Arc<dyn InboxAdmin>, inbox: &dyn Inbox) -> Received {
    for _ in 0..2 {
        let m = Received::new(MessageId::new(), "orders", b"ok".to_vec());
        inbox.start(&[m.id]).await.unwrap();
        inbox.process(&m).await.unwrap();
    }
    let mut bad = Received::new(MessageId::new(), "orders", b"poison".to_vec());
    bad.key = Some("k1".into());
    inbox.start(&[bad.id]).await.unwrap();
    inbox
        .failed(bad.id, "handler failed: no such customer")
        .await
        .unwrap();
    inbox
        .dead_letter(&bad, "handler failed: no such customer")
        .await
        .unwrap();
    assert_eq!(table.dead_letters(None, 10).await.unwrap().len(), 1);
    bad
}

/// Through the binary: list, requeue (a bad id, another consumer's, then the right one),
/// clean. `outbox_table` when the store's outbox table is not the default.
fn check(store: &str, outbox_table: Option<&str>, inbox_table: &str, bad: &Received) {
    let base: Vec<&str> = match outbox_table {
        Some(t) => vec!["--store", store, "--table", t],
        None => vec!["--store", store],
    };
    let with =
        |rest: &[&str]| -> Vec<String> { base.iter().chain(rest).map(|s| s.to_string()).collect() };
    let run = |rest: &[&str]| {
        let args = with(rest);
        run(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let json = |rest: &[&str]| {
        let args = with(rest);
        json(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let listed = json(&["inbox", "--inbox-table", inbox_table, "dead", "--json"]);
    let rows = listed["dead_letters"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{listed}");
    assert_eq!(rows[0]["id"], bad.id.to_string());
    assert_eq!(rows[0]["consumer"], "billing");
    assert_eq!(rows[0]["key"], "k1");
    assert_eq!(rows[0]["error"], "handler failed: no such customer");

    let out = run(&[
        "inbox",
        "--inbox-table",
        inbox_table,
        "requeue",
        "--consumer",
        "billing",
        "not-an-id",
    ]);
    assert_eq!(out.status.code(), Some(2), "a bad id is a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a message id"));

    let out = run(&[
        "inbox",
        "--inbox-table",
        inbox_table,
        "requeue",
        "--consumer",
        "audit",
        &bad.id.to_string(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "not a dead letter of that consumer"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a dead letter"));

    let out = run(&[
        "inbox",
        "--inbox-table",
        inbox_table,
        "requeue",
        "--consumer",
        "billing",
        &bad.id.to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = json(&["inbox", "--inbox-table", inbox_table, "dead", "--json"]);
    assert!(listed["dead_letters"].as_array().unwrap().is_empty());

    // Marks younger than the horizon stay; with a zero horizon the two processed ones go.
    let kept = json(&["clean", "--inbox", inbox_table, "--json"]);
    assert_eq!(kept["deleted"], 0);
    let gone = json(&[
        "clean",
        "--inbox",
        inbox_table,
        "--inbox-older-than",
        "0s",
        "--json",
    ]);
    assert_eq!(gone["deleted"], 2, "{gone}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_dead_letters_requeue_and_clean_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let url = format!("sqlite://{}", db.display());
    let out = run(&["--store", &url, "migrate", "--inbox", "inbox"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("inbox table inbox is ready"));
    let store = outbox_sqlite::SqliteStore::open(&db).unwrap();
    let table = store.inbox_table("inbox").unwrap();
    let inbox = table
        .consumer(
            "billing",
            |_: &outbox_sqlite::rusqlite::Transaction<'_>, _: &Received| Ok(()),
        )
        .unwrap();
    let bad = fill(Arc::new(table), &inbox).await;
    check(&url, None, "inbox", &bad);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_dead_letters_requeue_and_clean_on_postgres() {
    let url = std::env::var("OUTBOX_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let name = format!("inbox_{}", uuid::Uuid::now_v7().simple());
    let outbox_table = format!("outbox_{}", uuid::Uuid::now_v7().simple());
    let out = run(&[
        "--store",
        &url,
        "--table",
        &outbox_table,
        "migrate",
        "--inbox",
        &name,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store = outbox_sql::postgres::PgStore::connect(&url).await.unwrap();
    let table = store.inbox_table(&name).unwrap();
    let noop = outbox_sql::inbox::handler_fn::<outbox_sql::sqlx::Postgres, _>(|_, _| {
        Box::pin(async { Ok(()) })
    });
    let inbox = table.consumer("billing", noop).unwrap();
    let bad = fill(Arc::new(table), &inbox).await;
    check(&url, Some(&outbox_table), &name, &bad);
}
