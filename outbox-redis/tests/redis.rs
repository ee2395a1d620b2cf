//! Against the real Redis on loopback (OUTBOX_REDIS_URL, default redis://127.0.0.1:6379/),
//! each test on its own stream keys; the restart test runs a private redis-server.

use outbox_core::StoreAdmin;
use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use outbox_core::conformance::eventually;
use outbox_core::{
    Envelope, ErrorKind, KeepOrder, Message, MessageId, Outbox, Publisher, RecordingPublisher,
    Relay, Store,
};
use outbox_redis::RedisPublisher;
use outbox_sqlite::SqliteStore;
use outbox_testkit::{Issued, Pki, RedisTls};
use redis::AsyncCommands;

fn url() -> String {
    std::env::var("OUTBOX_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into())
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

fn env(dest: &str, payload: &str) -> Envelope {
    Envelope {
        id: MessageId::new(),
        created_at: std::time::SystemTime::now(),
        message: Message::new(dest, payload.as_bytes().to_vec()),
    }
}

async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    outbox_redis::client(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("Redis must be reachable")
}

type Entry = (String, HashMap<String, Vec<u8>>);

async fn entries(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> Vec<Entry> {
    let reply: redis::streams::StreamRangeReply = conn.xrange_all(key).await.unwrap();
    reply
        .ids
        .into_iter()
        .map(|e| {
            let fields = e
                .map
                .into_iter()
                .map(|(k, v)| (k, redis::from_redis_value::<Vec<u8>>(&v).unwrap()))
                .collect();
            (e.id, fields)
        })
        .collect()
}

fn text(fields: &HashMap<String, Vec<u8>>, name: &str) -> String {
    String::from_utf8(fields.get(name).cloned().unwrap_or_default()).unwrap()
}

#[tokio::test]
async fn streams_carry_id_stream_key_headers_and_payload() {
    let publisher = RedisPublisher::connect(&url()).await.unwrap();
    let key = unique("orders");
    let mut a = env(&key, r#"{"n":1}"#);
    a.message = a
        .message
        .clone()
        .stream("orders")
        .key("customer-7")
        .header("trace", "abc")
        .content_type("application/json");
    let b = env(&key, "plain");
    let out = publisher.publish_batch(&[&a, &b]).await;
    assert!(out.iter().all(|r| r.is_ok()), "{out:?}");

    let mut conn = raw(&url()).await;
    let got = entries(&mut conn, &key).await;
    assert_eq!(got.len(), 2);
    let f = &got[0].1;
    assert_eq!(text(f, "id"), a.id.to_string());
    assert_eq!(text(f, "stream"), "orders");
    assert_eq!(text(f, "key"), "customer-7");
    assert_eq!(text(f, "content-type"), "application/json");
    assert_eq!(text(f, "h:trace"), "abc");
    assert_eq!(f["payload"], br#"{"n":1}"#.to_vec());
    assert_eq!(text(&got[1].1, "id"), b.id.to_string());
    assert!(
        !got[1].1.contains_key("key"),
        "no key field when the message has none"
    );
    let _: () = conn.del(&key).await.unwrap();
}

#[tokio::test]
async fn maxlen_caps_the_stream() {
    let publisher = RedisPublisher::connect(&url())
        .await
        .unwrap()
        .streams(Some(10));
    let key = unique("capped");
    let batch: Vec<Envelope> = (0..500).map(|i| env(&key, &i.to_string())).collect();
    let refs: Vec<&Envelope> = batch.iter().collect();
    assert!(publisher
        .publish_batch(&refs)
        .await
        .iter()
        .all(|r| r.is_ok()));
    let mut conn = raw(&url()).await;
    let len: usize = conn.xlen(&key).await.unwrap();
    assert!(len < 500, "MAXLEN ~ 10 trimmed nothing: {len}");
    let _: () = conn.del(&key).await.unwrap();
}

/// One keep-order unit drains as pipelined runs (the publisher keeps a batch's order): every
/// message arrives once, in commit order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_order_unit_drains_as_ordered_pipelines() {
    let publisher = RedisPublisher::connect(&url()).await.unwrap();
    assert!(publisher.ordered_batches());
    let key = unique("one-unit");
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("o.db")).unwrap();
    store.migrate_now().unwrap();
    let outbox = Outbox::builder(store.clone(), RecordingPublisher::new())
        .strategy(KeepOrder::default())
        .build()
        .unwrap();
    let mut conn = store.connect().unwrap();
    for chunk in 0..4 {
        let mut tx = conn.transaction().unwrap();
        let msgs = (0..250)
            .map(|i| Message::new(&key, (chunk * 250 + i).to_string().into_bytes()).key("one"));
        let pending = outbox.enqueue_blocking(&mut tx, msgs).unwrap();
        outbox_sqlite::commit(tx, pending).unwrap();
    }
    let relay = Relay::builder(store.clone(), publisher)
        .batch_size(200)
        .build()
        .unwrap();
    let report = relay.run_once().await.unwrap();
    assert_eq!(report.published, 1000);
    let mut redis = raw(&url()).await;
    let got: Vec<String> = entries(&mut redis, &key)
        .await
        .into_iter()
        .map(|(_, f)| String::from_utf8(f["payload"].clone()).unwrap())
        .collect();
    assert_eq!(got, (0..1000).map(|i| i.to_string()).collect::<Vec<_>>());
    let _: () = redis.del(&key).await.unwrap();
}

#[tokio::test]
async fn a_bad_command_fails_only_its_message_permanently() {
    let publisher = RedisPublisher::connect(&url()).await.unwrap();
    let (good, bad) = (unique("good"), unique("string-key"));
    let mut conn = raw(&url()).await;
    let _: () = conn.set(&bad, "not a stream").await.unwrap();
    let batch = [env(&good, "1"), env(&bad, "2"), env(&good, "3")];
    let out = publisher
        .publish_batch(&batch.iter().collect::<Vec<_>>())
        .await;
    assert!(out[0].is_ok() && out[2].is_ok(), "{out:?}");
    let e = out[1].as_ref().unwrap_err();
    assert!(!e.is_transient(), "WRONGTYPE is permanent: {e}");
    assert_eq!(entries(&mut conn, &good).await.len(), 2);
    let _: () = conn.del(&[&good, &bad]).await.unwrap();
}

#[tokio::test]
async fn pubsub_publishes_the_payload_and_can_require_subscribers() {
    let channel = unique("chan");
    let publisher = RedisPublisher::connect(&url())
        .await
        .unwrap()
        .pubsub()
        .require_subscribers(true);
    let e = publisher.publish(&env(&channel, "lost")).await.unwrap_err();
    assert!(e.is_transient(), "no subscriber: retry later");

    let mut sub = redis::Client::open(url())
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    sub.subscribe(&channel).await.unwrap();
    publisher.publish(&env(&channel, "hello")).await.unwrap();
    use futures_util::StreamExt;
    let msg = tokio::time::timeout(Duration::from_secs(10), sub.on_message().next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(msg.get_payload_bytes(), b"hello");
}

#[tokio::test]
async fn bad_url_and_unreachable_server_are_typed_errors() {
    assert_eq!(
        RedisPublisher::connect("nope://x")
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::Config
    );
    let e = RedisPublisher::connect("redis://:sekrit@127.0.0.1:1/")
        .await
        .unwrap_err();
    assert!(e.is_transient());
    assert!(!format!("{e} {e:?}").contains("sekrit"));
}

/// A private redis-server with an fsync-always AOF, so acknowledged writes survive SIGKILL;
/// with `tls`, it listens for TLS only, with a certificate from the test's own CA.
struct PrivateRedis {
    child: Child,
    port: u16,
    dir: Option<tempfile::TempDir>,
    tls: Option<Arc<(Pki, Issued)>>,
}

impl PrivateRedis {
    fn start(port: u16, dir: tempfile::TempDir, tls: Option<Arc<(Pki, Issued)>>) -> Self {
        let mut cmd = Command::new("redis-server");
        match &tls {
            None => cmd.args(["--port", &port.to_string()]),
            Some(t) => cmd
                .args(["--port", "0", "--tls-port", &port.to_string()])
                .args(["--tls-auth-clients", "no", "--tls-cert-file"])
                .arg(&t.1.cert)
                .arg("--tls-key-file")
                .arg(&t.1.key),
        };
        let child = cmd
            .args(["--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "yes", "--appendfsync", "always", "--dir"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/setup.sh installs it)");
        Self {
            child,
            port,
            dir: Some(dir),
            tls,
        }
    }

    fn url(&self) -> String {
        match &self.tls {
            None => format!("redis://127.0.0.1:{}/", self.port),
            Some(t) => format!(
                "rediss://127.0.0.1:{}/?cacertfile={}",
                self.port,
                t.0.ca_path().display()
            ),
        }
    }

    /// SIGKILL; returns the data directory for a restart.
    fn kill(mut self) -> tempfile::TempDir {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.dir.take().unwrap()
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn up(url: &str) -> bool {
    match outbox_redis::client(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
    {
        Ok(mut c) => redis::cmd("PING")
            .query_async::<String>(&mut c)
            .await
            .is_ok(),
        Err(_) => false,
    }
}

const BACKLOG: usize = 300;

fn backlog_messages(chunk: usize) -> Vec<Message> {
    (0..BACKLOG / 10)
        .map(|i| {
            let i = chunk * (BACKLOG / 10) + i;
            Message::new("events", i.to_string().into_bytes()).key(format!("k{}", i % 5))
        })
        .collect()
}

/// A SQLite store holding the backlog, committed in ten transactions (the directory lives as
/// long as the store is used).
fn sqlite_backlog(dir: &tempfile::TempDir) -> SqliteStore {
    let store = SqliteStore::open(dir.path().join("o.db")).unwrap();
    store.migrate_now().unwrap();
    let outbox = Outbox::builder(store.clone(), RecordingPublisher::new())
        .strategy(KeepOrder::default())
        .build()
        .unwrap();
    let mut conn = store.connect().unwrap();
    for chunk in 0..10 {
        let mut tx = conn.transaction().unwrap();
        outbox
            .enqueue_blocking(&mut tx, backlog_messages(chunk))
            .unwrap()
            .dispatch();
        tx.commit().unwrap();
    }
    store
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_in_the_middle_of_a_relay_run_loses_nothing_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_backlog(&dir);
    redis_restart("sqlite", Arc::new(store), None).await;
}

/// The same outage over TLS: the publisher reconnects with a new TLS handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_over_tls_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite_backlog(&dir);
    let pki = Pki::new("outbox test CA");
    let cert = pki.server("redis", &["127.0.0.1"], false);
    redis_restart(
        "sqlite over TLS",
        Arc::new(store),
        Some(Arc::new((pki, cert))),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_in_the_middle_of_a_relay_run_loses_nothing_postgres() {
    use outbox_sql::postgres::{PgOptions, PgStore};
    let url = std::env::var("OUTBOX_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let table = format!("outbox_redis{}", uuid::Uuid::now_v7().simple());
    let store = PgStore::connect_with(
        &url,
        PgOptions {
            table,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    store.migrate().await.unwrap();
    let outbox = Outbox::builder(store.clone(), RecordingPublisher::new())
        .strategy(KeepOrder::default())
        .build()
        .unwrap();
    for chunk in 0..10 {
        let mut tx = store.pool().begin().await.unwrap();
        outbox
            .enqueue(&mut tx, backlog_messages(chunk))
            .await
            .unwrap()
            .dispatch();
        tx.commit().await.unwrap();
    }
    redis_restart("postgres", Arc::new(store), None).await;
}

/// Relay `store`'s backlog into a private Redis, SIGKILL Redis mid-run, restart it, and check
/// that everything arrives once at least, in per-key order, without a busy loop meanwhile.
async fn redis_restart(name: &str, store: Arc<dyn StoreAdmin>, tls: Option<Arc<(Pki, Issued)>>) {
    let n = BACKLOG;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = PrivateRedis::start(port, tempfile::tempdir().unwrap(), tls.clone());
    let url = server.url();
    eventually("private redis up", Duration::from_secs(20), || up(&url)).await;

    let publisher = RedisPublisher::connect(&url).await.unwrap();
    let relay = Relay::builder(store.clone(), publisher)
        .batch_size(10)
        .poll_interval(Duration::from_millis(20))
        .publish_timeout(Duration::from_secs(2))
        .retry(outbox_core::RetryPolicy {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(200),
            max_attempts: 10_000,
            ..Default::default()
        })
        .build()
        .unwrap();
    let running = outbox_core::conformance::RunningRelay::spawn(relay);

    // Kill Redis once part of the backlog is through, keep it down a moment, bring it back.
    let check = raw(&url).await;
    eventually("some messages published", Duration::from_secs(30), || {
        let mut c = check.clone();
        async move { c.xlen::<_, usize>("events").await.unwrap_or(0) >= 60 }
    })
    .await;
    let data = server.kill();
    let outage = std::time::Instant::now();
    eventually(
        "the relay notices the outage",
        Duration::from_secs(30),
        || async { outage.elapsed() > Duration::from_millis(300) },
    )
    .await;
    let pending_during_outage = store.stats().await.unwrap().total().pending;
    let server = PrivateRedis::start(port, data, tls);
    eventually("redis back", Duration::from_secs(20), || up(&url)).await;
    eventually(
        "backlog drained after the restart",
        Duration::from_secs(60),
        || async { store.stats().await.unwrap().total().pending == 0 },
    )
    .await;
    let report = running.stop().await;

    let mut check = raw(&url).await;
    let got = entries(&mut check, "events").await;
    let mut d = outbox_core::conformance::Deliveries::default();
    for (_, f) in &got {
        d.record(
            text(f, "id"),
            text(f, "key"),
            text(f, "payload").parse().unwrap(),
        );
    }
    let duplicates = d.duplicates();
    println!(
        "[{name}] redis restart: {n} messages, {} entries, {duplicates} duplicates, {} failed attempts, {pending_during_outage} pending during the outage",
        got.len(),
        report.failed
    );
    assert_eq!(d.distinct(), n, "every message reached Redis");
    assert!(pending_during_outage > 0, "the outage happened mid-run");
    // Backoff, not a busy loop: a relay retrying without pause fails thousands of times here.
    assert!(
        report.failed <= 200,
        "{} failed attempts during a short outage",
        report.failed
    );
    assert!(
        duplicates <= 10,
        "at most one batch duplicated by the kill, got {duplicates}"
    );
    assert_eq!(d.order_violations(), 0, "keys out of order");
    drop(server);
}

/// rediss:// verifies the server against the CA file, refuses another CA, and presents a
/// client certificate when the server requires one; TLS files are checked at connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_verifies_the_server_and_presents_client_certificates() {
    let pki = Pki::new("outbox test CA");
    let cert = pki.server("redis", &["localhost", "127.0.0.1"], false);
    let ca = pki.ca_path().display().to_string();
    let server = RedisTls::start(&pki, &cert, false);
    let key = unique("tls");
    let url = format!("rediss://localhost:{}/0?cacertfile={ca}", server.port);
    let publisher = RedisPublisher::connect(&url).await.unwrap();
    publisher.publish(&env(&key, "over-tls")).await.unwrap();
    let mut check = raw(&url).await;
    let got = entries(&mut check, &key).await;
    assert_eq!(text(&got[0].1, "payload"), "over-tls");

    // Another CA's bundle: the handshake fails, as a transient error that says why.
    let stranger = Pki::new("some other CA");
    let e = RedisPublisher::connect(&format!(
        "rediss://localhost:{}/0?cacertfile={}",
        server.port,
        stranger.ca_path().display()
    ))
    .await
    .unwrap_err();
    assert!(e.is_transient(), "{e}");
    assert!(e.to_string().contains("cannot connect to Redis"), "{e}");

    // A server that requires client certificates.
    let strict = RedisTls::start(&pki, &cert, true);
    let base = format!("rediss://127.0.0.1:{}/0?cacertfile={ca}", strict.port);
    let refused = match RedisPublisher::connect(&base).await {
        Err(_) => true,
        Ok(p) => p.publish(&env(&key, "x")).await.is_err(),
    };
    assert!(refused, "a client without a certificate was served");
    let client = pki.client("client", "outbox-relay");
    let with_cert = format!(
        "{base}&certfile={}&keyfile={}",
        client.cert.display(),
        client.key.display()
    );
    let p = RedisPublisher::connect(&with_cert).await.unwrap();
    p.publish(&env(&key, "with-client-cert")).await.unwrap();

    // Bad TLS settings are configuration errors naming the parameter.
    for (url, says) in [
        (
            format!("redis://127.0.0.1:6379/?cacertfile={ca}"),
            "rediss://",
        ),
        (
            "rediss://127.0.0.1:6379/?cacertfile=/nonexistent.pem".to_owned(),
            "cacertfile",
        ),
        (
            format!("rediss://127.0.0.1:6379/?certfile={ca}"),
            "go together",
        ),
        (
            format!(
                "rediss://:pw@127.0.0.1:6379/?cacertfile={}",
                client.key.display()
            ),
            "cacertfile",
        ),
    ] {
        let e = RedisPublisher::connect(&url).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config, "{url}: {e}");
        assert!(e.to_string().contains(says), "{url}: {e}");
        assert!(!e.to_string().contains(":pw@"), "{e}");
    }
}

/// Half-open broker connections: the publisher's connection to Redis stops forwarding
/// without closing (a partition, a NAT that lost its flow) while new connections work. Each
/// publish fails at `publish_timeout`, and the publisher must give the dead connection up
/// and open a new one, so everything is delivered; a publisher that kept waiting on the
/// dead connection would time out forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_redis_connection_is_replaced() {
    let target: std::net::SocketAddr = url()
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let proxy = outbox_testkit::BlackholeProxy::start(target).await;
    let publisher = RedisPublisher::connect(&format!("redis://127.0.0.1:{}/", proxy.port))
        .await
        .unwrap()
        .streams(None);
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("t.db")).unwrap();
    store.migrate_now().unwrap();
    let key = unique("outbox-halfopen-");
    let outbox = Outbox::writer(store.clone())
        .strategy(KeepOrder::default())
        .build()
        .unwrap();
    let commit = |from: usize| {
        let mut conn = store.connect().unwrap();
        let mut tx = conn.transaction().unwrap();
        let msgs: Vec<Message> = (from..from + 3)
            .map(|i| Message::new(key.clone(), i.to_string().into_bytes()).key(format!("k{i}")))
            .collect();
        drop(outbox.enqueue_blocking(&mut tx, msgs).unwrap());
        tx.commit().unwrap();
    };
    let relay = outbox
        .relay_with(publisher)
        .publish_timeout(Duration::from_millis(500))
        .retry(outbox_core::RetryPolicy {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(200),
            max_attempts: 1000,
            ..Default::default()
        })
        .poll_interval(Duration::from_millis(50))
        .build()
        .unwrap();
    let running = outbox_core::conformance::RunningRelay::spawn(relay);
    let conn = raw(&url()).await;
    let count = || {
        let (mut conn, key) = (conn.clone(), key.clone());
        async move { entries(&mut conn, &key).await.len() }
    };
    commit(0);
    eventually(
        "published through the proxy",
        Duration::from_secs(20),
        || async { count().await == 3 },
    )
    .await;
    proxy.blackhole_existing();
    commit(3);
    eventually(
        "published on a new connection after the old one went half-open",
        Duration::from_secs(45),
        || async { count().await >= 6 },
    )
    .await;
    running.stop().await;
    let _: () = conn.clone().del(&key).await.unwrap();
}
