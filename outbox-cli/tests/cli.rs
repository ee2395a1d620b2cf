//! The `outbox` binary end to end, against SQLite files and the real PostgreSQL.

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use outbox_core::{
    Error, FaultyPublisher, KeepOrder, Message, Outbox, RecordingPublisher, Strategy,
};
use outbox_sql::postgres::{PgOptions, PgStore};
use outbox_sqlite::SqliteStore;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_outbox"));
    for var in [
        "OUTBOX_CONFIG",
        "OUTBOX_STORE",
        "OUTBOX_TABLE",
        "OUTBOX_PUBLISHER",
        "OUTBOX_STREAMS",
        "OUTBOX_STORE_FILE",
        "OUTBOX_PUBLISHER_FILE",
        "OUTBOX_SIGNING_KEYS",
        "OUTBOX_SIGNING_KEYS_FILE",
        "RUST_LOG",
    ] {
        c.env_remove(var);
    }
    c
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "outbox {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Exits non-zero with one `error:` line on stderr; returns that line.
fn fails(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "expected a failure, got success");
    let stderr = String::from_utf8(out.stderr).unwrap();
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "one error line expected in: {stderr}");
    errors[0].to_owned()
}

fn payloads(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .filter(|l| l.starts_with("published "))
        .map(|l| l.rsplit("payload=").next().unwrap().to_owned())
        .collect()
}

fn sqlite_enqueue(path: &std::path::Path, msgs: Vec<Message>, strategy: impl Strategy) {
    let store = SqliteStore::open(path).unwrap();
    let outbox = Outbox::builder(store.clone(), RecordingPublisher::new())
        .strategy(strategy)
        .build()
        .unwrap();
    let mut conn = store.connect().unwrap();
    let mut tx = conn.transaction().unwrap();
    drop(outbox.enqueue_blocking(&mut tx, msgs).unwrap());
    tx.commit().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_migrate_relay_stats_dead_letters_and_clean() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let store_url = format!("sqlite://{}", db.display());
    let s = store_url.as_str();
    let first = ok(&["--store", s, "migrate"]);
    assert!(
        first.contains("ready (schema version 1; applied step 1)"),
        "{first}"
    );
    let again = ok(&["--store", s, "--output", "json", "migrate"]);
    let again: serde_json::Value = serde_json::from_str(again.trim()).unwrap();
    assert_eq!(
        (
            again["schema_version"].as_u64(),
            again["applied"].as_array().map(Vec::len)
        ),
        (Some(outbox_core::SCHEMA_VERSION as u64), Some(0)),
        "{again}"
    );

    let msgs = (0..5)
        .map(|i| {
            Message::new("orders.placed", i.to_string().into_bytes())
                .stream("orders")
                .key("c1")
        })
        .collect();
    sqlite_enqueue(&db, msgs, KeepOrder::default());
    // A dead letter: a permanent failure on the publish-on-commit path.
    {
        let store = SqliteStore::open(&db).unwrap();
        let failing = FaultyPublisher::new(RecordingPublisher::new(), |_| {
            Some(Error::permanent("rejected"))
        });
        let outbox = Outbox::builder(store.clone(), failing).build().unwrap();
        let mut conn = store.connect().unwrap();
        let mut tx = conn.transaction().unwrap();
        let pending = outbox
            .enqueue_blocking(
                &mut tx,
                [Message::new("emails", b"dead".to_vec()).stream("emails")],
            )
            .unwrap();
        tx.commit().unwrap();
        assert_eq!(pending.publish().await.failed, 1);
    }

    let out = ok(&["--store", s, "relay", "--publisher", "stdout"]);
    assert_eq!(
        payloads(&out),
        vec!["0", "1", "2", "3", "4"],
        "in commit order: {out}"
    );
    let stats = ok(&["--store", s, "stats"]);
    let orders = stats.lines().find(|l| l.starts_with("orders")).unwrap();
    let cols: Vec<&str> = orders.split_whitespace().collect();
    assert_eq!(&cols[1..4], &["0", "5", "0"], "{stats}");
    let emails: Vec<&str> = stats
        .lines()
        .find(|l| l.starts_with("emails"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(&emails[1..4], &["0", "0", "1"], "{stats}");

    let dead = ok(&["--store", s, "dead", "list"]);
    assert!(
        dead.contains("stream=emails") && dead.contains("rejected"),
        "{dead}"
    );
    assert_eq!(
        ok(&["--store", s, "dead", "requeue", "--stream", "emails"]).trim(),
        "requeued 1"
    );
    assert_eq!(
        payloads(&ok(&["--store", s, "relay", "--publisher", "stdout"])),
        vec!["dead"]
    );
    assert_eq!(
        ok(&["--store", s, "dead", "purge", "--all"]).trim(),
        "purged 0"
    );
    assert_eq!(
        ok(&["--store", s, "clean"]).trim(),
        "deleted 0 rows",
        "7-day default retention"
    );
    assert_eq!(
        ok(&["--store", s, "clean", "--older-than", "0s"]).trim(),
        "deleted 6 rows"
    );
    assert!(
        run(&["--store", s, "dead", "requeue"]).status.code() == Some(2),
        "requeue needs a selection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_then_env_then_flags() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let cfg = dir.path().join("outbox.toml");
    std::fs::write(
        &cfg,
        format!("store = \"sqlite://{}\"\n[relay]\npublisher = \"stdout\"\nstreams = [\"a\"]\ninterval = \"100ms\"\n", db.display()),
    )
    .unwrap();
    let c = cfg.to_str().unwrap();
    ok(&["--config", c, "migrate"]);
    let msgs = ["a", "b", "c"]
        .iter()
        .map(|s| Message::new("d", s.as_bytes().to_vec()).stream(*s))
        .collect();
    sqlite_enqueue(&db, msgs, KeepOrder::default());

    assert_eq!(
        payloads(&ok(&["--config", c, "relay"])),
        vec!["a"],
        "the file's stream filter"
    );
    let env = bin()
        .args(["--config", c, "relay"])
        .env("OUTBOX_STREAMS", "b")
        .output()
        .unwrap();
    assert_eq!(
        payloads(&String::from_utf8(env.stdout).unwrap()),
        vec!["b"],
        "env wins over the file"
    );
    assert_eq!(
        payloads(&ok(&["--config", c, "relay", "--stream", "c"])),
        vec!["c"],
        "flags win over env and file"
    );

    // JSON logs on request, on stderr.
    let out = bin()
        .args(["--config", c, "--log-format", "json", "relay"])
        .output()
        .unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    let first = stderr.lines().next().unwrap_or("");
    assert!(
        first.starts_with('{') && first.contains("\"level\""),
        "{stderr}"
    );
}

#[test]
fn bad_input_is_one_clear_line_and_a_non_zero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("x.db").display());

    let e = fails(bin().args(["--store", &db, "stats"]));
    assert!(
        e.contains("no SQLite database") && e.contains("outbox migrate"),
        "{e}"
    );
    let e = fails(bin().args(["--store", "bogus://x", "stats"]));
    assert!(e.contains("unsupported store URL"), "{e}");
    let e = fails(bin().args(["--store", "postgres://app:hunter2@127.0.0.1:1/db", "stats"]));
    assert!(
        e.contains("cannot connect") && e.contains("app:***@") && !e.contains("hunter2"),
        "{e}"
    );
    let e = fails(bin().args(["stats"]));
    assert!(e.contains("no store"), "{e}");
    assert!(ok(&["--store", &db, "migrate"]).contains("ready"));
    let e = fails(bin().args(["--store", &db, "relay", "--publisher", "mqtt://x"]));
    assert!(e.contains("unsupported publisher"), "{e}");
    let e = fails(bin().args(["--store", &db, "relay", "--publisher", "nats://x"]));
    assert!(e.contains("cannot connect to NATS at nats://x"), "{e}");
    let e = fails(bin().args([
        "--store",
        &db,
        "relay",
        "--publisher",
        "redis://:s3cret@127.0.0.1:1/",
    ]));
    assert!(
        e.contains("cannot connect to Redis") && !e.contains("s3cret"),
        "{e}"
    );
    let e = fails(bin().args(["--store", &db, "--table", "x;drop", "stats"]));
    assert!(e.contains("invalid table name"), "{e}");
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "store = 1\n").unwrap();
    let e = fails(bin().args(["--config", cfg.to_str().unwrap(), "stats"]));
    assert!(e.contains("malformed config file"), "{e}");
    std::fs::write(&cfg, "[relay]\nintervall = \"1s\"\n").unwrap();
    let e = fails(bin().args(["--config", cfg.to_str().unwrap(), "--store", &db, "stats"]));
    assert!(
        e.contains("unknown field"),
        "a typo in the file is an error: {e}"
    );
    let out = run(&[
        "--store",
        &db,
        "relay",
        "--publisher",
        "stdout",
        "--interval",
        "soon",
    ]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a bad duration is a usage error"
    );
}

fn pg_url() -> String {
    std::env::var("OUTBOX_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A store on `table` (migrated by the test) and a keep-order outbox writing to it.
async fn keep_order_outbox(url: &str, table: &str) -> (PgStore, Outbox<PgStore>) {
    let store = PgStore::connect_with(
        url,
        PgOptions {
            table: table.to_owned(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let outbox = Outbox::builder(store.clone(), RecordingPublisher::new())
        .strategy(KeepOrder::default())
        .build()
        .unwrap();
    (store, outbox)
}

/// `relay --loop --no-listen` (PgBouncer in transaction mode, many stores on one server):
/// it polls every `--interval` and holds no LISTEN connection while it publishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_loop_without_listen_polls() {
    let table = format!("outbox_cli{}", uuid::Uuid::now_v7().simple());
    let url = pg_url();
    assert!(ok(&["--store", &url, "--table", &table, "migrate"]).contains("ready"));
    let (store, outbox) = keep_order_outbox(&url, &table).await;
    let mut child = bin()
        .args([
            "--store",
            &url,
            "--table",
            &table,
            "relay",
            "--publisher",
            "stdout",
        ])
        .args(["--loop", "--interval", "100ms", "--no-listen"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut tx_db = store.pool().begin().await.unwrap();
    let msgs: Vec<Message> = (0..3)
        .map(|i: u8| Message::new("d", i.to_string().into_bytes()).key("k"))
        .collect();
    drop(outbox.enqueue(&mut tx_db, msgs).await.unwrap());
    tx_db.commit().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut got = Vec::new();
    while got.len() < 3 {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("relay polled within the deadline");
        if line.starts_with("published ") {
            got.push(line.rsplit("payload=").next().unwrap().to_owned());
        }
    }
    assert_eq!(got, vec!["0", "1", "2"]);
    let listeners: i64 = outbox_sql::postgres::sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE query ILIKE 'LISTEN%' AND query ILIKE $1",
    )
    .bind(format!("%{table}%"))
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(listeners, 0, "--no-listen opened a LISTEN connection");
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_loop_wakes_on_notify_serves_metrics_and_stops_on_sigterm() {
    let table = format!("outbox_cli{}", uuid::Uuid::now_v7().simple());
    let url = pg_url();
    assert!(ok(&["--store", &url, "--table", &table, "migrate"]).contains("ready"));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics = format!("127.0.0.1:{port}");
    let (store, outbox) = keep_order_outbox(&url, &table).await;
    let commit = |payloads: std::ops::Range<u8>| {
        let (store, outbox) = (store.clone(), outbox.clone());
        async move {
            let mut tx_db = store.pool().begin().await.unwrap();
            let msgs: Vec<Message> = payloads
                .map(|i| Message::new("d", i.to_string().into_bytes()).key("k"))
                .collect();
            drop(outbox.enqueue(&mut tx_db, msgs).await.unwrap());
            tx_db.commit().await.unwrap();
        }
    };
    // Committed before the relay starts: its first claim (after LISTEN) publishes it. Once
    // it is out, no sleep is needed: every later commit is heard, or waits 60 s.
    commit(9..10).await;
    let mut child = bin()
        .args([
            "--store",
            &url,
            "--table",
            &table,
            "relay",
            "--publisher",
            "stdout",
            "--loop",
            "--interval",
            "60s",
        ])
        .args(["--metrics-addr", &metrics])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });

    // A 60 s poll interval: only NOTIFY gets these out within the deadline.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut got = Vec::new();
    let mut committed = false;
    while got.len() < 4 {
        if got == ["9"] && !committed {
            committed = true;
            commit(0..3).await;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("relay published within the deadline");
        if let Some(p) = line
            .rsplit("payload=")
            .next()
            .filter(|_| line.starts_with("published "))
        {
            got.push(p.to_owned());
        }
    }
    assert_eq!(got, vec!["9", "0", "1", "2"]);

    let body = http(&metrics, "GET", "/metrics").await;
    assert!(body.contains("outbox_published_total"), "{body}");
    assert!(body.contains("outbox_publish_seconds"), "{body}");
    assert!(
        body.contains("outbox_backlog{stream=\"*\"}"),
        "backlog gauge exported: {body}"
    );

    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "relay did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "graceful stop exits 0: {status:?}");
    let stats = ok(&["--store", &url, "--table", &table, "stats"]);
    assert!(
        stats
            .lines()
            .any(|l| l.starts_with("default") && l.split_whitespace().nth(2) == Some("4")),
        "{stats}"
    );
}

/// A row whose stream carries a terminal escape sequence (written by SQL) is quarantined by
/// the relay, and `relay`, `dead list` and `stats` print it escaped, never raw.
#[test]
fn hostile_text_in_rows_is_quarantined_and_printed_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let store_url = format!("sqlite://{}", db.display());
    let s = store_url.as_str();
    ok(&["--store", s, "migrate"]);
    let msgs = (0..3)
        .map(|i| Message::new("d", format!("m{i}").into_bytes()).stream("orders"))
        .collect();
    sqlite_enqueue(&db, msgs, KeepOrder::default());
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute(
            "UPDATE outbox SET stream = 'evil' || char(27) || '[2J' WHERE payload = CAST('m1' AS BLOB)",
            [],
        )
        .unwrap();
    let out = run(&["--store", s, "relay", "--publisher", "stdout"]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "a run that quarantined a row is partial (exit 4)"
    );
    let (stdout, stderr) = (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    );
    assert_eq!(payloads(&stdout), vec!["m0", "m2"], "{stdout}");
    assert!(stderr.contains("quarantined"), "{stderr}");
    for args in [vec!["dead", "list"], vec!["stats"]] {
        let text = ok(&[&["--store", s][..], &args[..]].concat());
        assert!(!text.contains('\u{1b}'), "raw ESC printed by {args:?}");
        assert!(text.contains("evil\\u{1b}[2J"), "{args:?}: {text}");
    }
}

/// Settings out of range are one clear `Config` error line, never a wrap, a panic or a huge
/// allocation.
#[test]
fn settings_out_of_range_are_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("x.db").display());
    assert!(ok(&["--store", &db, "migrate"]).contains("ready"));
    for (args, says) in [
        (
            vec![
                "relay",
                "--publisher",
                "stdout",
                "--lease",
                "18446744073709551615s",
            ],
            "lease",
        ),
        (
            vec![
                "relay",
                "--publisher",
                "stdout",
                "--concurrency",
                "100000000",
            ],
            "concurrency",
        ),
        (
            vec!["relay", "--publisher", "stdout", "--batch", "1000000000"],
            "batch_size",
        ),
        (
            vec!["relay", "--publisher", "stdout", "--max-attempts", "0"],
            "max_attempts",
        ),
        (
            vec!["clean", "--older-than", "1000000000years"],
            "retention",
        ),
        (
            vec![
                "clean",
                "--inbox",
                "inbox",
                "--inbox-older-than",
                "18446744073709551615s",
            ],
            "inbox retention",
        ),
        (vec!["clean", "--batch", "0"], "batch_size"),
    ] {
        let mut cmd = bin();
        cmd.args(["--store", &db]).args(&args);
        let e = fails(&mut cmd);
        assert!(e.contains(says), "{args:?}: {e}");
        assert_eq!(
            cmd.status().unwrap().code(),
            Some(2),
            "{args:?}: a configuration error"
        );
    }
}

/// SQLite databases are created readable by their owner only, and only by `migrate`: a
/// mistyped path in `stats` or `relay` is an error, not a new empty database.
#[cfg(unix)]
#[test]
fn sqlite_files_are_private_and_only_migrate_creates_them() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("typo.db");
    let url = format!("sqlite://{}", db.display());
    for args in [
        vec!["stats"],
        vec!["relay", "--publisher", "stdout"],
        vec!["dead", "list"],
    ] {
        let e = fails(bin().args(["--store", &url]).args(&args));
        assert!(e.contains("no SQLite database"), "{args:?}: {e}");
        assert!(!db.exists(), "{args:?} created {}", db.display());
    }
    ok(&["--store", &url, "migrate"]);
    let mode = std::fs::metadata(&db).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "database mode {mode:o}");
    // A table that exists: a table missing in an existing file is still its own error.
    let e = fails(bin().args(["--store", &url, "--table", "other", "stats"]));
    assert!(
        e.contains("does not exist") && e.contains("outbox migrate"),
        "{e}"
    );
    // A world-readable database is used, with a warning.
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = bin().args(["--store", &url, "stats"]).output().unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("readable by every user"), "{err}");
    // A link to nothing is refused, and its target not created.
    let target = dir.path().join("elsewhere.db");
    let link = dir.path().join("link.db");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let link_url = format!("sqlite://{}", link.display());
    let e = fails(bin().args(["--store", &link_url, "migrate"]));
    assert!(
        e.contains("symbolic link to a file that does not exist"),
        "{e}"
    );
    assert!(!target.exists(), "the link's target was created");
}

async fn http(addr: &str, method: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    body
}

/// The metrics endpoint answers `GET /metrics` only, and per-stream gauge series are capped
/// (the rest summed under "(other)") however many streams the table holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_is_get_only_and_series_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let store_url = format!("sqlite://{}", db.display());
    ok(&["--store", &store_url, "migrate"]);
    let msgs = (0..150)
        .map(|i| Message::new("d", b"x".to_vec()).stream(format!("s{i:03}")))
        .collect();
    sqlite_enqueue(&db, msgs, KeepOrder::default());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = bin()
        .args([
            "--store",
            &store_url,
            "relay",
            "--publisher",
            "null",
            "--loop",
        ])
        .args(["--metrics-addr", &addr])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        if let Ok(true) = tokio::net::TcpStream::connect(&addr).await.map(|_| true) {
            let body = http(&addr, "GET", "/metrics").await;
            if body.contains("outbox_backlog{stream=\"*\"}") {
                break body;
            }
        }
        assert!(Instant::now() < deadline, "no backlog gauges served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    let series = body
        .lines()
        .filter(|l| l.starts_with("outbox_backlog{"))
        .count();
    assert_eq!(series, 102, "100 streams, (other) and *: {series}");
    assert!(body.contains("outbox_backlog{stream=\"(other)\"}"));
    assert!(http(&addr, "POST", "/metrics")
        .await
        .starts_with("HTTP/1.1 405"));
    assert!(http(&addr, "GET", "/").await.starts_with("HTTP/1.1 404"));
    assert!(http(&addr, "GET", "/admin")
        .await
        .starts_with("HTTP/1.1 404"));
    child.kill().unwrap();
    child.wait().unwrap();
}

/// `relay --help` names every publisher the command accepts, and each one it names is
/// accepted (`null` and `stdout` run here; the broker URLs are covered by their own tests).
#[test]
fn relay_help_lists_every_publisher() {
    let help = ok(&["relay", "--help"]);
    for scheme in ["stdout", "null", "kafka://", "amqp(s)://", "redis(s)://"] {
        assert!(help.contains(scheme), "{scheme} missing from:\n{help}");
    }
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("app.db").display());
    ok(&["--store", &store, "migrate"]);
    for publisher in ["stdout", "null"] {
        ok(&["--store", &store, "relay", "--publisher", publisher]);
    }
}
