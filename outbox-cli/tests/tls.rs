//! The `outbox` binary over TLS: a relay reading a PostgreSQL store with `sslmode=require`
//! and publishing to a Redis that only speaks TLS and requires a password, both URLs read
//! from files (mounted secrets), never printed; a wrong CA fails with one clear line.

use std::process::Command;

use outbox_core::{KeepOrder, Message, Outbox, RecordingPublisher};
use outbox_sql::postgres::{PgOptions, PgStore};
use outbox_testkit::{Pki, RedisTls};
use redis::AsyncCommands;

const REDIS_PASSWORD: &str = "r3d/is?pa#ss@word";

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_outbox"));
    for (var, _) in std::env::vars() {
        if var.starts_with("OUTBOX_") && var != "OUTBOX_PG_URL" || var == "RUST_LOG" {
            c.env_remove(var);
        }
    }
    c
}

fn pg_url() -> String {
    std::env::var("OUTBOX_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_over_tls_with_urls_from_files() {
    let pki = Pki::new("outbox test CA");
    let cert = pki.server("redis", &["127.0.0.1"], false);
    let redis = RedisTls::start_with(&pki, &cert, false, &["--requirepass", REDIS_PASSWORD]);
    let table = format!("outbox_clitls{}", uuid::Uuid::now_v7().simple());
    let store_url = format!("{}?sslmode=require", pg_url());
    let publisher_url = format!(
        "rediss://:{}@127.0.0.1:{}/0?cacertfile={}",
        encode(REDIS_PASSWORD),
        redis.port,
        pki.ca_path().display()
    );
    let store_file = pki.dir().join("store-url");
    let publisher_file = pki.dir().join("publisher-url");
    std::fs::write(&store_file, format!("{store_url}\n")).unwrap();
    std::fs::write(&publisher_file, format!("{publisher_url}\n")).unwrap();

    let out = bin()
        .args(["--table", &table, "migrate"])
        .env("OUTBOX_STORE_FILE", &store_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let store = PgStore::connect_with(
        &store_url,
        PgOptions {
            table: table.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let outbox = Outbox::builder(store.clone(), RecordingPublisher::new())
        .strategy(KeepOrder::default())
        .build()
        .unwrap();
    let key = format!("tls-{}", uuid::Uuid::now_v7().simple());
    let mut tx = store.pool().begin().await.unwrap();
    let msgs: Vec<Message> = (0..5)
        .map(|i| Message::new(key.as_str(), i.to_string().into_bytes()).key("k"))
        .collect();
    drop(outbox.enqueue(&mut tx, msgs).await.unwrap());
    tx.commit().await.unwrap();

    let out = bin()
        .args(["--table", &table, "relay", "--publisher-file"])
        .arg(&publisher_file)
        .env("OUTBOX_STORE_FILE", &store_file)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    for secret in [REDIS_PASSWORD, &encode(REDIS_PASSWORD)] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{stderr}"
        );
    }
    let mut check = outbox_redis::client(&publisher_url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let len: usize = check.xlen(&key).await.unwrap();
    assert_eq!(len, 5, "every message reached Redis over TLS");

    // The wrong CA: one clear error line, exit code non-zero, no password.
    let stranger = Pki::new("some other CA");
    let wrong = publisher_url.replace(
        &pki.ca_path().display().to_string(),
        &stranger.ca_path().display().to_string(),
    );
    std::fs::write(&publisher_file, wrong).unwrap();
    let out = bin()
        .args(["--table", &table, "relay", "--publisher-file"])
        .arg(&publisher_file)
        .env("OUTBOX_STORE_FILE", &store_file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains("cannot connect to Redis"), "{stderr}");
    assert!(!stderr.contains(REDIS_PASSWORD) && !stderr.contains(&encode(REDIS_PASSWORD)));
}

#[test]
fn passwords_with_url_delimiters_never_reach_the_output() {
    for password in ["Abc/Def=", "p?ss#word", "p@ss:w/rd"] {
        let url = format!("postgres://app:{password}@127.0.0.1:1/shop?sslmode=require");
        let out = bin().args(["--store", &url, "stats"]).output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success());
        assert!(text.contains("app:***@"), "{text}");
        assert!(!text.contains(password), "{password} printed: {text}");
    }
    let out = bin()
        .args(["--store-file", "/nonexistent/url", "stats"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot read the store URL file"),
        "{stderr}"
    );
}

/// A password given as a flag draws a warning (flags show in `ps`), and a config file whose
/// value has the wrong type is reported without the value.
#[test]
fn flag_passwords_warn_and_config_errors_hide_values() {
    let out = bin()
        .args([
            "--store",
            "postgres://app:flag-pw-123@127.0.0.1:1/shop",
            "stats",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("process list") && stderr.contains("OUTBOX_STORE"),
        "{stderr}"
    );
    assert!(!stderr.contains("flag-pw-123"), "{stderr}");
    let quiet = bin()
        .args(["stats"])
        .env("OUTBOX_STORE", "postgres://app:env-pw-123@127.0.0.1:1/shop")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&quiet.stderr);
    assert!(
        !stderr.contains("process list") && !stderr.contains("env-pw-123"),
        "{stderr}"
    );

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("outbox.toml");
    std::fs::write(
        &cfg,
        "store = \"sqlite://x.db\"\n[relay]\nsigning_keys = \"k1:toml-secret-0123456789\"\n",
    )
    .unwrap();
    let out = bin()
        .args(["--config", cfg.to_str().unwrap(), "stats"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("malformed config file") && stderr.contains("line 3"),
        "{stderr}"
    );
    assert!(!stderr.contains("toml-secret"), "{stderr}");
}

/// `RUST_LOG=trace` never prints a broker password: a relay connecting to RabbitMQ as a user
/// of the test's own (so the password differs from the user name) logs at trace level.
#[test]
fn trace_logs_carry_no_broker_password() {
    let (user, password) = ("outbox_trace_probe", "trace-probe-secret-pw");
    for args in [
        vec!["add_user", user, password],
        vec!["set_permissions", "-p", "/", user, ".*", ".*", ".*"],
    ] {
        // add_user fails when the user exists from an earlier run: that is fine.
        let _ = Command::new("rabbitmqctl").args(&args).output();
    }
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("a.db").display());
    assert!(bin()
        .args(["--store", &store, "migrate"])
        .status()
        .unwrap()
        .success());
    let out = bin()
        .args(["--store", &store, "relay", "--publisher"])
        .arg(format!("amqp://{user}:{password}@127.0.0.1:5672/%2f"))
        .env("RUST_LOG", "trace")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("TRACE") || text.contains("DEBUG"),
        "trace logging is on: {text}"
    );
    assert!(
        !text.contains(password),
        "password in the trace output: {text}"
    );
}
