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
    // Without RUST_LOG the client's debug lines stay out (a cap must never raise a level).
    let out = bin()
        .args(["--store", &store, "relay", "--publisher"])
        .arg(format!("amqp://{user}:{password}@127.0.0.1:5672/%2f"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("DEBUG") && !text.contains("TRACE"), "{text}");

    // NATS: the client logs its CONNECT (password included) at debug.
    let nats = outbox_testkit::NatsServer::start_with(&["--user", "relay", "--pass", password]);
    let out = bin()
        .args(["--store", &store, "relay", "--publisher"])
        .arg(format!("nats://relay:{password}@127.0.0.1:{}", nats.port))
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
        !text.contains(password),
        "password in the trace output: {text}"
    );
}

/// `doctor --json` with `SSL_CERT_FILE` standing in for the system's roots: the status and
/// detail of the store check, and of the publisher check when one is named.
fn doctor(
    system_roots: &std::path::Path,
    store: &str,
    publisher: Option<&str>,
) -> Vec<(String, String)> {
    let mut c = bin();
    c.args(["--store", store, "--json", "doctor"])
        .env("SSL_CERT_FILE", system_roots)
        .env_remove("SSL_CERT_DIR");
    if let Some(p) = publisher {
        c.args(["--publisher", p]);
    }
    let out = c.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let doc: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{e}: {text} {}", String::from_utf8_lossy(&out.stderr)));
    let checks = doc["checks"].as_array().unwrap().clone();
    ["store", "publisher"]
        .iter()
        .filter_map(|name| checks.iter().find(|c| c["check"] == *name))
        .map(|c| {
            (
                c["status"].as_str().unwrap().to_owned(),
                c["detail"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// A named CA file replaces the system's roots, as libpq means `sslrootcert` ("trust these
/// CAs"): a server whose certificate chains to a CA the system trusts, but not to the one
/// named, is refused. PostgreSQL (`sslrootcert`), MariaDB (`ssl-ca`) and RabbitMQ
/// (`cacertfile`); Redis and NATS build their roots from the named file already.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_ca_replaces_the_system_roots() {
    use outbox_testkit::{MariaDbTls, Protocol, TlsProxy};
    let system = Pki::new("a CA the system trusts");
    let named = Pki::new("the CA the operator named");
    let cert = system.server("server", &["127.0.0.1"], false);
    let roots = system.ca_path();

    // postgres://user@host:port/db of the plain server.
    let plain = pg_url();
    let rest = plain.split_once("://").unwrap().1;
    let (user, rest) = rest.split_once('@').unwrap();
    let (hostport, db) = rest.split_once('/').unwrap();
    let db = db.split('?').next().unwrap();
    let port = hostport.rsplit_once(':').map_or("5432", |(_, p)| p);
    let upstream = format!("127.0.0.1:{port}").parse().unwrap();
    let pg = TlsProxy::start(
        upstream,
        Protocol::Postgres,
        system.server_config(&cert, false),
    )
    .await;
    let pg_url = |ca: Option<&Pki>| {
        let mut u = format!(
            "postgres://{user}@127.0.0.1:{}/{db}?sslmode=verify-full",
            pg.addr.port(),
        );
        if let Some(ca) = ca {
            u.push_str(&format!("&sslrootcert={}", ca.ca_path().display()));
        }
        u
    };
    let mariadb = MariaDbTls::start(&cert, &roots);
    let my_url = |ca: &Pki| {
        format!(
            "mysql://root@127.0.0.1:{}/test?ssl-mode=VERIFY_IDENTITY&ssl-ca={}",
            mariadb.port,
            ca.ca_path().display()
        )
    };
    let amqp_plain = std::env::var("OUTBOX_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let amqp_port: u16 = amqp_plain
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split('/').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or(5672);
    let amqp = TlsProxy::start(
        format!("127.0.0.1:{amqp_port}").parse().unwrap(),
        Protocol::Tls,
        system.server_config(&cert, false),
    )
    .await;
    let amqps = |ca: &Pki| {
        format!(
            "amqps://guest:guest@127.0.0.1:{}/%2f?cacertfile={}",
            amqp.addr.port(),
            ca.ca_path().display()
        )
    };

    // The system's roots are trusted when no CA is named (so the refusals below are the
    // named file's doing), and the named CA that signed the certificate is trusted too.
    let ok = doctor(&roots, &pg_url(None), None);
    assert_eq!(ok[0].0, "OK", "{ok:?}");
    let ok = doctor(&roots, &pg_url(Some(&system)), Some(&amqps(&system)));
    assert_eq!((ok[0].0.as_str(), ok[1].0.as_str()), ("OK", "OK"), "{ok:?}");
    let ok = doctor(&roots, &my_url(&system), None);
    assert_eq!(ok[0].0, "OK", "{ok:?}");

    // Another CA named: refused, though a system root signed the certificate.
    let refused = doctor(&roots, &pg_url(Some(&named)), Some(&amqps(&named)));
    assert_eq!(
        refused[0].0, "FAIL",
        "PostgreSQL trusted a system root: {refused:?}"
    );
    assert!(
        refused[0].1.to_lowercase().contains("unknownissuer"),
        "{refused:?}"
    );
    assert_eq!(
        refused[1].0, "FAIL",
        "RabbitMQ trusted a system root: {refused:?}"
    );
    let refused = doctor(&roots, &my_url(&named), None);
    assert_eq!(
        refused[0].0, "FAIL",
        "MariaDB trusted a system root: {refused:?}"
    );
    assert!(
        refused[0].1.to_lowercase().contains("unknownissuer"),
        "{refused:?}"
    );
}
