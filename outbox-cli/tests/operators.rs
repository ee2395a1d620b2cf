//! The `outbox` command for operators and scripts: JSON documents, exit codes, error lines
//! that say what to do, no colour codes off a terminal, `doctor`, interruptible bulk
//! operations, completions and the manual page.

use outbox_core::StoreAdmin;
use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use outbox_core::{Error, FaultyPublisher, KeepOrder, Message, Outbox, RecordingPublisher};
use outbox_sqlite::SqliteStore;
use serde_json::Value;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_outbox"));
    for (var, _) in std::env::vars() {
        if var.starts_with("OUTBOX_") || var == "RUST_LOG" || var == "NO_COLOR" {
            c.env_remove(var);
        }
    }
    c
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

fn stdout_json(args: &[&str]) -> Value {
    let out = run(args);
    assert!(
        out.status.success(),
        "outbox {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "outbox {args:?} printed no JSON document ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn pg_url() -> String {
    std::env::var("OUTBOX_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn redis_url() -> String {
    std::env::var("OUTBOX_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into())
}

/// A migrated SQLite database with 3 keep-order messages and 2 dead letters.
async fn sqlite_with_rows(dir: &tempfile::TempDir) -> String {
    let db = dir.path().join("app.db");
    let url = format!("sqlite://{}", db.display());
    assert!(run(&["--store", &url, "migrate"]).status.success());
    let store = SqliteStore::open(&db).unwrap();
    let keep = Outbox::writer(store.clone())
        .strategy(KeepOrder::default())
        .build()
        .unwrap();
    let failing = FaultyPublisher::new(RecordingPublisher::new(), |_| {
        Some(Error::permanent("rejected"))
    });
    let on_commit = Outbox::builder(store.clone(), failing).build().unwrap();
    let mut conn = store.connect().unwrap();
    let mut tx = conn.transaction().unwrap();
    drop(
        keep.enqueue_blocking(
            &mut tx,
            (0..3).map(|i| Message::new("d", vec![b'0' + i]).stream("orders").key("k")),
        )
        .unwrap(),
    );
    let dead = on_commit
        .enqueue_blocking(
            &mut tx,
            (0..2).map(|i| Message::new("mail", vec![i]).stream("emails")),
        )
        .unwrap();
    tx.commit().unwrap();
    assert_eq!(dead.publish().await.failed, 2);
    url
}

/// Every command that prints data prints one JSON document with `--output json` (or
/// `--json`), with the field names the README documents.
#[tokio::test]
async fn data_commands_print_one_json_document() {
    let dir = tempfile::tempdir().unwrap();
    let s = &sqlite_with_rows(&dir).await;

    let m = stdout_json(&["--store", s, "migrate", "--output", "json"]);
    assert_eq!(
        (m["table"].as_str(), m["ready"].as_bool()),
        (Some("outbox"), Some(true))
    );

    let stats = stdout_json(&["--store", s, "stats", "--json"]);
    assert_eq!(stats["total"]["pending"], 3);
    assert_eq!(stats["total"]["dead"], 2);
    assert!(stats["total"]["oldest_pending_seconds"].as_f64().unwrap() >= 0.0);
    let orders = stats["streams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stream"] == "orders")
        .unwrap();
    assert_eq!(
        (orders["pending"].as_u64(), orders["sent"].as_u64()),
        (Some(3), Some(0))
    );

    let dead = stdout_json(&["--store", s, "--output", "json", "dead", "list"]);
    let rows = dead["messages"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert!(
        rows[0]["seq"].as_i64() > rows[1]["seq"].as_i64(),
        "newest first, as the console"
    );
    let page = stdout_json(&["--store", s, "--json", "dead", "list", "--limit", "1"]);
    let before = page["next_before"].as_i64().unwrap().to_string();
    let rest = stdout_json(&["--store", s, "--json", "dead", "list", "--before", &before]);
    assert_eq!(rest["messages"][0]["seq"], rows[1]["seq"]);
    assert!(rest["next_before"].is_null());
    for r in rows {
        assert_eq!(r["stream"], "emails");
        assert_eq!(r["attempts"], 1);
        assert!(r["last_error"].as_str().unwrap().contains("rejected"));
        assert!(r["seq"].as_i64().is_some() && r["id"].as_str().is_some());
    }
    let seq = rows[0]["seq"].as_i64().unwrap().to_string();
    let requeued = stdout_json(&["--store", s, "--json", "dead", "requeue", "--seq", &seq]);
    assert_eq!(
        (
            requeued["requeued"].as_u64(),
            requeued["finished"].as_bool()
        ),
        (Some(1), Some(true))
    );
    let purged = stdout_json(&["--store", s, "--json", "dead", "purge", "--all"]);
    assert_eq!(purged["purged"], 1);

    let relay = run(&["--store", s, "relay", "--publisher", "null"]);
    assert!(relay.status.success());
    let clean = stdout_json(&["--store", s, "--json", "clean", "--older-than", "0s"]);
    assert_eq!(
        (clean["deleted"].as_u64(), clean["finished"].as_bool()),
        (Some(4), Some(true))
    );
}

/// An operator parks a unit, lists it, sees that a relay leaves it alone, skips its head and
/// resumes the rest; a unit that is not parked (or does not exist) is exit code 1 with a hint,
/// and nothing changes.
#[tokio::test]
async fn operators_park_list_skip_and_resume_units() {
    let dir = tempfile::tempdir().unwrap();
    let s = &sqlite_with_rows(&dir).await; // orders/k: 0, 1, 2 (keep-order)
    let parked = stdout_json(&[
        "--store",
        s,
        "--json",
        "park",
        "orders",
        "k",
        "--reason",
        "ledger down",
    ]);
    assert_eq!(
        (
            parked["action"].as_str(),
            parked["unit"].as_str(),
            parked["changed"].as_u64()
        ),
        (Some("park"), Some("k"), Some(1))
    );
    let list = stdout_json(&["--store", s, "--json", "parked"]);
    let units = list["parked"].as_array().unwrap();
    assert_eq!(units.len(), 1);
    assert_eq!(
        (
            units[0]["stream"].as_str(),
            units[0]["unit"].as_str(),
            units[0]["pending"].as_u64()
        ),
        (Some("orders"), Some("k"), Some(3))
    );
    assert_eq!(units[0]["reason"], "ledger down");
    let head = units[0]["head_seq"].as_i64().unwrap();
    let text = run(&["--store", s, "parked", "--stream", "orders"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("unit=k") && text.contains("pending=3"),
        "{text}"
    );

    // The relay leaves the parked unit alone.
    let relay = run(&["--store", s, "relay", "--publisher", "stdout"]);
    assert!(relay.status.success());
    assert!(String::from_utf8_lossy(&relay.stdout).trim().is_empty());

    for args in [
        ["resume", "orders", "nope"],
        ["skip", "orders", "nope"],
        ["park", "orders", "nope"],
        ["resume", "emails", "k"],
    ] {
        let out = run(&[&["--store", s][..], &args[..]].concat());
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("hint:") && err.contains("outbox parked"),
            "{err}"
        );
    }
    let skipped = stdout_json(&["--store", s, "--json", "skip", "orders", "k"]);
    assert_eq!(skipped["dead_lettered_seq"].as_i64(), Some(head));
    assert_eq!(skipped["action"], "skip");
    assert!(stdout_json(&["--store", s, "--json", "parked"])["parked"]
        .as_array()
        .unwrap()
        .is_empty());
    let relay = run(&["--store", s, "relay", "--publisher", "stdout"]);
    let out = String::from_utf8_lossy(&relay.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    let again = run(&["--store", s, "resume", "orders", "k"]);
    assert_eq!(again.status.code(), Some(1));
}

/// Log lines written to a pipe or file carry no ANSI colour codes; errors lead with the
/// problem, say what to do, and the exit code tells configuration (2), unreachable
/// service (3) and partial runs (4) apart.
#[tokio::test]
async fn plain_logs_clear_errors_and_distinct_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let s = &sqlite_with_rows(&dir).await;
    // A row another program broke: the relay quarantines it and publishes the rest, a
    // partial run (exit 4).
    let store = SqliteStore::open(dir.path().join("app.db")).unwrap();
    let conn = store.connect().unwrap();
    conn.execute(
        "UPDATE outbox SET headers = '[1]' WHERE seq = (SELECT MIN(seq) FROM outbox WHERE status = 'pending')",
        [],
    )
    .unwrap();
    drop(conn);
    let out = run(&["--store", s, "relay", "--publisher", "stdout"]);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("relay starting"), "{stderr}");
    assert!(
        !stderr.contains('\u{1b}'),
        "colour codes in a pipe: {stderr:?}"
    );

    let missing = dir.path().join("no/such/folder/x.db");
    let out = run(&[
        "--store",
        &format!("sqlite://{}", missing.display()),
        "migrate",
    ]);
    let stderr = String::from_utf8(out.stderr).unwrap();
    let first = stderr.lines().next().unwrap();
    assert!(
        first.starts_with("error: cannot open the SQLite database")
            && first.contains("the folder")
            && first.contains("does not exist"),
        "{stderr}"
    );
    assert!(
        !first.contains("Config ("),
        "the kind stays out of the human line: {first}"
    );
    assert!(stderr.lines().any(|l| l.starts_with("hint: ")), "{stderr}");
    assert_eq!(out.status.code(), Some(2));

    let out = run(&[
        "--store",
        "postgres://app:hunter2secret@127.0.0.1:1/db",
        "stats",
    ]);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("hint: check that the database runs"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2secret"), "{stderr}");

    // JSON logs keep the kind and the exit code.
    let out = run(&[
        "--log-format",
        "json",
        "--store",
        "postgres://app:hunter2secret@127.0.0.1:1/db",
        "stats",
    ]);
    let line = String::from_utf8(out.stderr).unwrap();
    let doc: Value = serde_json::from_str(line.lines().last().unwrap()).unwrap();
    assert_eq!(doc["kind"], "Store");
    assert_eq!(doc["exit_code"], 3);
    assert_eq!(doc["level"], "ERROR");
    assert!(
        doc["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{doc}"
    );
    // --json (output) asks for JSON errors too.
    let out = run(&[
        "--json",
        "--store",
        "postgres://app@127.0.0.1:1/db",
        "stats",
    ]);
    let line = String::from_utf8(out.stderr).unwrap();
    let doc: Value = serde_json::from_str(line.lines().last().unwrap())
        .unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(
        (doc["kind"].as_str(), doc["exit_code"].as_u64()),
        (Some("Store"), Some(3))
    );

    let help = String::from_utf8(run(&["--help"]).stdout).unwrap();
    for code in ["Exit codes:", "  2  ", "  3  ", "  4  ", "  130  "] {
        assert!(help.contains(code), "{code} missing from --help:\n{help}");
    }
}

fn doctor(args: &[&str]) -> (i32, Value) {
    let out = bin()
        .args(["doctor", "--json"])
        .args(args)
        .output()
        .unwrap();
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor printed no JSON ({e}): {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap(), doc)
}

fn status<'a>(doc: &'a Value, check: &str) -> &'a str {
    doc["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == check)
        .unwrap_or_else(|| panic!("no {check} check in {doc}"))["status"]
        .as_str()
        .unwrap()
}

/// `doctor` on healthy set-ups (SQLite; PostgreSQL with NOTIFY and a Redis publisher), then
/// with each thing broken: every failure is its own FAIL line and a non-zero exit.
#[tokio::test]
async fn doctor_checks_a_deployment_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let s = &sqlite_with_rows(&dir).await;
    let (code, doc) = doctor(&["--store", s]);
    assert_eq!(code, 0, "{doc}");
    for (check, want) in [
        ("store", "OK"),
        ("table", "OK"),
        ("schema", "OK"),
        ("notify", "SKIP"),
        ("clock", "OK"),
        ("publisher", "SKIP"),
        ("signing", "OK"),
    ] {
        assert_eq!(status(&doc, check), want, "{check}: {doc}");
    }
    // Text output: one line per check.
    let out = bin().args(["--store", s, "doctor"]).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 7, "{text}");
    assert!(text.lines().all(|l| ["OK ", "WARN", "FAIL", "SKIP"]
        .iter()
        .any(|p| l.starts_with(p))));

    // PostgreSQL: NOTIFY heard, clock compared, Redis pinged.
    let table = format!("outbox_doc{}", uuid::Uuid::now_v7().simple());
    let pg = pg_url();
    assert!(run(&["--store", &pg, "--table", &table, "migrate"])
        .status
        .success());
    let redis = redis_url();
    let (pg, table) = (pg.as_str(), table.as_str());
    let (code, doc) = doctor(&["--store", pg, "--table", table, "--publisher", &redis]);
    assert_eq!(code, 0, "{doc}");
    for check in ["store", "table", "schema", "notify", "clock", "publisher"] {
        assert_eq!(status(&doc, check), "OK", "{check}: {doc}");
    }

    // Broken, one thing at a time.
    let (code, doc) = doctor(&[
        "--store",
        pg,
        "--table",
        table,
        "--publisher",
        "redis://127.0.0.1:1/",
    ]);
    assert_eq!((code, status(&doc, "publisher")), (1, "FAIL"), "{doc}");
    let (code, doc) = doctor(&["--store", pg, "--table", "outbox_never_migrated"]);
    assert_eq!((code, status(&doc, "table")), (1, "FAIL"), "{doc}");
    let (code, doc) = doctor(&["--store", "postgres://app:hunter2secret@127.0.0.1:1/db"]);
    assert_eq!((code, status(&doc, "store")), (1, "FAIL"), "{doc}");
    assert!(!doc.to_string().contains("hunter2secret"), "{doc}");
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "not a key line\n").unwrap();
    let (code, doc) = doctor(&["--store", s, "--signing-keys-file", keys.to_str().unwrap()]);
    assert_eq!((code, status(&doc, "signing")), (1, "FAIL"), "{doc}");

    let store = SqliteStore::open(dir.path().join("app.db")).unwrap();
    let conn = store.connect().unwrap();
    conn.execute_batch("CREATE TABLE outbox_claim (x INTEGER)")
        .unwrap();
    let (code, doc) = doctor(&["--store", s]);
    assert_eq!(
        (code, status(&doc, "schema")),
        (0, "WARN"),
        "a 0.1 leftover: {doc}"
    );
    conn.execute_batch("DROP INDEX outbox_due_next").unwrap();
    let (code, doc) = doctor(&["--store", s]);
    assert_eq!((code, status(&doc, "schema")), (1, "FAIL"), "{doc}");
    assert!(doc.to_string().contains("outbox_due_next"), "{doc}");
    // A schema version recorded by a newer build: FAIL, and it says so.
    conn.execute_batch(
        "CREATE INDEX outbox_due_next ON outbox_due (next_at);
         DROP TABLE outbox_claim;
         INSERT INTO outbox_schema (version, name, applied_at) VALUES (99, 'newer', 0);",
    )
    .unwrap();
    let (code, doc) = doctor(&["--store", s]);
    assert_eq!((code, status(&doc, "schema")), (1, "FAIL"), "{doc}");
    assert!(
        doc.to_string().contains("schema version 99 is newer"),
        "{doc}"
    );
    // None recorded (a table made before versions): FAIL, run migrate.
    conn.execute_batch("DROP TABLE outbox_schema").unwrap();
    let (code, doc) = doctor(&["--store", s]);
    assert_eq!((code, status(&doc, "schema")), (1, "FAIL"), "{doc}");
    assert!(doc.to_string().contains("outbox migrate"), "{doc}");
}

/// `clean` works in bounded batches; Ctrl-C (SIGINT) stops it between two of them: exit 130,
/// what it deleted is reported, and the table holds exactly the rest.
#[test]
fn clean_stops_between_batches_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("big.db");
    let url = format!("sqlite://{}", db.display());
    assert!(run(&["--store", &url, "migrate"]).status.success());
    let total: i64 = 300_000;
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute(
        &format!(
            "INSERT INTO outbox (id, stream, destination, msg_key, okey, payload, content_type, headers,
                 strategy, status, attempts, created_at, next_attempt_at, sent_at)
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {total})
             SELECT printf('00000000-0000-7000-8000-%012d', i), 'default', 'd', NULL, '', x'00',
                 'application/octet-stream', '{{}}', 'on_commit', 'sent', 1, 0, 0, 1 FROM n"
        ),
        [],
    )
    .unwrap();
    let mut child = bin()
        .args([
            "--store",
            &url,
            "--json",
            "clean",
            "--older-than",
            "0s",
            "--batch",
            "20",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut lines = stderr.lines().map_while(Result::ok);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let line = lines.next().expect("clean reports progress");
        if line.contains("clean in progress") {
            break;
        }
        assert!(Instant::now() < deadline);
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let rest: String = lines.collect::<Vec<_>>().join("\n");
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{rest}");
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["finished"], false, "stopped before the end: {doc}");
    let deleted = doc["deleted"].as_i64().unwrap();
    assert!(deleted > 0 && deleted < total, "{doc}");
    assert_eq!(deleted % 20, 0, "whole batches only: {doc}");
    let left: i64 = conn
        .query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))
        .unwrap();
    assert_eq!(left, total - deleted, "the table holds exactly the rest");
}

/// Completion scripts and the manual page come from the same definition as `--help`.
#[test]
fn completions_and_manual_page() {
    for shell in ["bash", "zsh", "fish"] {
        let out = run(&["completions", shell]);
        assert!(out.status.success());
        let script = String::from_utf8(out.stdout).unwrap();
        for word in ["relay", "doctor", "dead", "--store"] {
            assert!(script.contains(word), "{shell} completion lacks {word}");
        }
    }
    let man = String::from_utf8(run(&["man"]).stdout).unwrap();
    assert!(man.starts_with(".ie") || man.contains(".TH"), "{man}");
    assert!(
        man.contains("doctor") && man.contains("Exit codes"),
        "{man}"
    );
}

/// A relay started with `--loop` while its broker is down waits for it as it waits for its
/// database (a broker outage during a deploy is not a crash loop under systemd or
/// Kubernetes): it logs and retries, publishes once the broker is up, and stops with exit 0
/// on SIGTERM. Without `--loop` it exits at once with one error line (exit 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_relay_waits_for_its_broker() {
    use outbox_core::{RelayOnly, Store};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("late.db");
    let store_url = format!("sqlite://{}", db.display());
    assert!(run(&["--store", &store_url, "migrate"]).status.success());
    let store = SqliteStore::open(&db).unwrap();
    let outbox = Outbox::writer(store.clone())
        .strategy(RelayOnly)
        .build()
        .unwrap();
    let key = format!("late-broker-{}", uuid::Uuid::now_v7().simple());
    let mut conn = store.connect().unwrap();
    let mut tx = conn.transaction().unwrap();
    drop(
        outbox
            .enqueue_blocking(
                &mut tx,
                (0..3).map(|i| Message::new(key.clone(), vec![b'0' + i])),
            )
            .unwrap(),
    );
    tx.commit().unwrap();

    // A permanent problem is not waited for, loop or not: exit 2 at once.
    let bad = run(&[
        "--store",
        &store_url,
        "relay",
        "--loop",
        "--publisher",
        "ftp://nowhere",
    ]);
    assert_eq!(
        bad.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );

    let port = outbox_testkit::free_port();
    let publisher = format!("redis://127.0.0.1:{port}/0");
    let once = run(&["--store", &store_url, "relay", "--publisher", &publisher]);
    let stderr = String::from_utf8_lossy(&once.stderr);
    assert_eq!(once.status.code(), Some(3), "{stderr}");

    let mut relay = bin()
        .args([
            "--store",
            &store_url,
            "relay",
            "--loop",
            "--interval",
            "200ms",
        ])
        .args(["--publisher", &publisher])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = BufReader::new(relay.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut warnings = 0;
    while warnings < 2 {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the relay logs while it waits for the broker");
        if line.contains("cannot use the publisher yet") {
            warnings += 1;
        }
    }
    assert!(relay.try_wait().unwrap().is_none(), "the relay exited");

    // The broker comes up on that port.
    let _redis = outbox_testkit::Server::spawn(
        "redis-server",
        &[
            "--port".into(),
            port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--save".into(),
            String::new(),
            "--appendonly".into(),
            "no".into(),
        ],
        &dir.path().join("redis.log"),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while store.stats().await.unwrap().total().sent < 3 {
        assert!(
            Instant::now() < deadline,
            "not published once the broker was up"
        );
        store.wait_for_work(Duration::from_millis(100)).await;
    }
    let client = redis::Client::open(publisher.as_str()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let len: u64 = redis::cmd("XLEN")
        .arg(&key)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(len, 3);

    Command::new("kill")
        .args(["-TERM", &relay.id().to_string()])
        .status()
        .unwrap();
    let status = relay.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

/// Errors name their cause at once and their exit code matches the README; redaction hides
/// secrets and never what the user needs to see; logs carry no `Debug` values; a reader that
/// stops early is not an error.
#[tokio::test]
async fn errors_name_their_cause_and_nothing_the_user_needs_is_hidden() {
    let stderr_of = |out: &Output| String::from_utf8_lossy(&out.stderr).into_owned();
    // A database on a closed port: refused at once, with the address.
    let port = outbox_testkit::free_port();
    let started = Instant::now();
    let out = run(&[
        "--store",
        &format!("postgres://postgres@127.0.0.1:{port}/test"),
        "stats",
    ]);
    let e = stderr_of(&out);
    assert_eq!(out.status.code(), Some(3), "{e}");
    assert!(
        e.contains("Connection refused") && e.contains(&format!("127.0.0.1:{port}")),
        "{e}"
    );
    assert!(
        !e.contains("pool timed out") && !e.contains("Store (Transient)"),
        "{e}"
    );
    eprintln!("refused after {:?}", started.elapsed());
    // A wrong password: a setting to fix (2), not an unreachable service (3).
    let out = run(&[
        "--store",
        "mysql://root:not-the-password@127.0.0.1:3306/test",
        "stats",
    ]);
    let e = stderr_of(&out);
    assert_eq!(out.status.code(), Some(2), "{e}");
    assert!(
        e.contains("refused the login") && !e.contains("not-the-password"),
        "{e}"
    );
    // Paths and host:port are shown as given; no password warning for them.
    let out = run(&["--store", "data/app.db", "stats"]);
    let e = stderr_of(&out);
    assert!(
        e.contains("sqlite://data/app.db") && !e.contains("<redacted>"),
        "{e}"
    );
    assert!(!e.contains("carries a password"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let s = &sqlite_with_rows(&dir).await;
    let out = run(&[
        "--store",
        s,
        "relay",
        "--publisher",
        &format!("nats://127.0.0.1:{port}"),
    ]);
    assert!(
        stderr_of(&out).contains("Connection refused"),
        "{}",
        stderr_of(&out)
    );
    let out = run(&["--store", s, "relay", "--publisher", "127.0.0.1:6379"]);
    let e = stderr_of(&out);
    assert!(
        e.contains("127.0.0.1:6379") && !e.contains("carries a password"),
        "{e}"
    );
    // A missing table: exit 1 and the migrate hint (README), not a setting to fix.
    let out = run(&["--store", s, "--table", "nope", "stats"]);
    let e = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{e}");
    assert!(
        e.contains("outbox migrate") && !e.contains("fix the setting"),
        "{e}"
    );
    // A TOML syntax error says what the parser expected.
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "store = \n").unwrap();
    let e = stderr_of(&run(&["--config", config.to_str().unwrap(), "stats"]));
    assert!(e.contains("expected `\"`") && !e.contains("<value>"), "{e}");
    // Logs: counts as fields, no Debug values; a new table is created, not "converted".
    let out = run(&["--store", s, "relay", "--publisher", "null"]);
    let e = stderr_of(&out);
    assert!(
        e.contains("relay finished") && e.contains("published="),
        "{e}"
    );
    assert!(!e.contains("BatchReport") && !e.contains("Some("), "{e}");
    let fresh = format!("sqlite://{}", dir.path().join("fresh.db").display());
    let e = stderr_of(&run(&["--store", &fresh, "migrate"]));
    // (Not "0.1" anywhere: a log timestamp such as 21:46:20.185 holds it.)
    assert!(
        e.contains("creating the table") && !e.contains("version 0.1"),
        "{e}"
    );
    // A reader that stops early: exit 0, no panic.
    for args in [vec!["completions", "bash"], vec!["man"]] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = bin().args(&args).stdout(writer).output().unwrap();
        let e = stderr_of(&out);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {e}");
        assert!(!e.contains("panicked"), "{args:?}: {e}");
    }
}
