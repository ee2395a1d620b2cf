//! The NATS JetStream publisher against a real nats-server of the test's own (JetStream on, a
//! store directory kept across its restart): per-key order and every id through a relay, an
//! unknown subject dead-lettered, and the server killed and restarted mid-run with nothing
//! lost and the duplicate window absorbing the relay's retries.

use outbox_core::StoreAdmin;
use std::time::{Duration, Instant};

use async_nats::jetstream::stream::Config;
use outbox_core::{KeepOrder, Message, Outbox, Publisher as _, RetryPolicy, Store};
use outbox_nats::NatsPublisher;
use outbox_testkit::NatsServer;

async fn stream(p: &NatsPublisher, name: &str) -> async_nats::jetstream::stream::Stream {
    p.jetstream()
        .create_stream(Config {
            name: name.into(),
            subjects: vec![format!("{name}.>")],
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .unwrap()
}

/// (key, n) of every message in the stream, in stream order, with the outbox ids.
async fn read(s: &async_nats::jetstream::stream::Stream, count: u64) -> Vec<(String, String, u32)> {
    let mut out = Vec::new();
    for seq in 1..=count {
        let m = s.get_raw_message(seq).await.unwrap();
        let h = |n: &str| {
            m.headers
                .get(n)
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default()
        };
        let n: u32 = std::str::from_utf8(&m.payload).unwrap().parse().unwrap();
        out.push((h("outbox-id"), h("outbox-key"), n));
    }
    out
}

fn keyed(subject: &str, n: u32) -> Message {
    Message::new(subject, n.to_string().into_bytes())
        .stream("orders")
        .key(format!("k{}", n % 3))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_ids_and_unknown_subjects() {
    let server = NatsServer::start();
    let publisher = NatsPublisher::connect(&server.url()).await.unwrap();
    let mut s = stream(&publisher, "orders1").await;
    let dir = tempfile::tempdir().unwrap();
    let store = outbox_sqlite::SqliteStore::open(dir.path().join("app.db")).unwrap();
    store.migrate().await.unwrap();
    let outbox = Outbox::writer(store.clone())
        .strategy(KeepOrder::default())
        .build()
        .unwrap();
    let mut conn = store.connect().unwrap();
    let mut tx = conn.transaction().unwrap();
    let mut msgs: Vec<Message> = (0..60).map(|n| keyed("orders1.placed", n)).collect();
    msgs.push(
        Message::new("nowhere.at.all", b"1".to_vec())
            .stream("lost")
            .key("x"),
    );
    drop(outbox.enqueue_blocking(&mut tx, msgs).unwrap());
    tx.commit().unwrap();
    let relay = outbox
        .relay_with(publisher.clone())
        .dead_letter_keep_order(true)
        .build()
        .unwrap();
    relay.run_once().await.unwrap();
    assert_eq!(s.info().await.unwrap().state.messages, 60);
    let got = read(&s, 60).await;
    for k in ["k0", "k1", "k2"] {
        let ns: Vec<u32> = got.iter().filter(|g| g.1 == k).map(|g| g.2).collect();
        assert!(ns.windows(2).all(|w| w[0] < w[1]), "{k}: {ns:?}");
        assert_eq!(ns.len(), 20);
    }
    let ids: std::collections::HashSet<&String> = got.iter().map(|g| &g.0).collect();
    assert_eq!(ids.len(), 60);
    let dead = store.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("no JetStream stream"),
        "{:?}",
        dead[0].last_error
    );
    publisher.check().await.unwrap();
}

/// Headers NATS obeys (`Nats-Msg-Id`, `Nats-Rollup`, `Nats-Expected-*`, in any case) are
/// refused, not sent: one could make JetStream drop another message as a duplicate, erase a
/// subject's history or make the publish conditional. A message cannot carry an `outbox-key`
/// of its own either (the inbox would trust it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_nats_obeys_are_refused() {
    let server = NatsServer::start();
    let publisher = NatsPublisher::connect(&server.url()).await.unwrap();
    let mut s = stream(&publisher, "hdrs").await;
    let dir = tempfile::tempdir().unwrap();
    let store = outbox_sqlite::SqliteStore::open(dir.path().join("app.db")).unwrap();
    store.migrate().await.unwrap();
    let outbox = Outbox::writer(store.clone()).build().unwrap();
    let mut conn = store.connect().unwrap();
    let mut tx = conn.transaction().unwrap();
    let plain = |n: u32| Message::new("hdrs.a", n.to_string().into_bytes()).stream("h");
    let msgs = vec![
        plain(1),
        plain(2).header("Nats-Msg-Id", "chosen"),
        plain(3).header("nats-msg-id", "chosen"),
        plain(4).header("Nats-Rollup", "sub"),
        plain(5).header("NATS-Expected-Stream", "other"),
        plain(6).header("x-trace", "kept"),
    ];
    drop(outbox.enqueue_blocking(&mut tx, msgs).unwrap());
    let spoof = outbox.enqueue_blocking(&mut tx, [plain(7).header("Outbox-Key", "victim")]);
    assert!(
        spoof.unwrap_err().to_string().contains("reserved"),
        "an outbox-key header of the message's own"
    );
    tx.commit().unwrap();
    let relay = outbox.relay_with(publisher.clone()).build().unwrap();
    relay.run_once().await.unwrap();
    // Only the two plain messages reached the stream; the rollup erased nothing.
    assert_eq!(s.info().await.unwrap().state.messages, 2);
    let got = read(&s, 2).await;
    assert_eq!(got.iter().map(|g| g.2).collect::<Vec<_>>(), [1, 6]);
    assert!(
        got.iter().all(|g| g.1.is_empty()),
        "an unkeyed message has no key"
    );
    let kept = s.get_raw_message(2).await.unwrap();
    assert_eq!(kept.headers.get("x-trace").unwrap().as_str(), "kept");
    let dead = store.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 4);
    for d in &dead {
        let e = d.last_error.as_deref().unwrap();
        assert!(e.contains("is reserved"), "{e}");
        assert_eq!(d.attempts, 1, "refused at once, not retried");
    }
}

/// A server that requires a user and password, and one that requires a token: the URL's
/// credentials are used (the client library ignores them in the URL), a wrong one is a
/// permanent `Config` error, and no password or token is ever in an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_the_url_are_used_and_never_printed() {
    use outbox_core::ErrorKind;
    let server = NatsServer::start_with(&["--user", "relay", "--pass", "s3cret/pw?"]);
    let at = |userinfo: &str| format!("nats://{userinfo}@127.0.0.1:{}", server.port);
    let e = NatsPublisher::connect(&server.url()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    let e = NatsPublisher::connect(&at("relay:wrong-pw-123"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    assert!(!format!("{e} {e:?}").contains("wrong-pw-123"), "{e}");
    let p = NatsPublisher::connect(&at("relay:s3cret%2Fpw%3F"))
        .await
        .unwrap();
    let mut s = stream(&p, "authed").await;
    let envelope = outbox_core::Envelope {
        id: outbox_core::MessageId::new(),
        created_at: std::time::SystemTime::now(),
        message: Message::new("authed.one", b"1".to_vec()),
    };
    p.publish(&envelope).await.unwrap();
    assert_eq!(s.info().await.unwrap().state.messages, 1);

    let token = "t0ken-value-0123456789";
    let server = NatsServer::start_with(&["--auth", token]);
    let at = |userinfo: &str| format!("nats://{userinfo}@127.0.0.1:{}", server.port);
    NatsPublisher::connect(&at(token))
        .await
        .unwrap()
        .check()
        .await
        .unwrap();
    let e = NatsPublisher::connect(&at("not-the-token-42"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    assert!(!format!("{e} {e:?}").contains("not-the-token-42"), "{e}");
    let e = NatsPublisher::connect(&format!("{}?creds=/nonexistent.creds", at(token)))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    assert!(!e.to_string().contains(token), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_and_restarted_mid_run() {
    let mut server = NatsServer::start();
    let publisher = NatsPublisher::connect(&server.url()).await.unwrap();
    let mut s = stream(&publisher, "orders2").await;
    let dir = tempfile::tempdir().unwrap();
    let store = outbox_sqlite::SqliteStore::open(dir.path().join("app.db")).unwrap();
    store.migrate().await.unwrap();
    let outbox = Outbox::writer(store.clone())
        .strategy(KeepOrder::default())
        .build()
        .unwrap();
    let total = 300u32;
    let write = |from: u32, to: u32| {
        let mut conn = store.connect().unwrap();
        let mut tx = conn.transaction().unwrap();
        drop(
            outbox
                .enqueue_blocking(&mut tx, (from..to).map(|n| keyed("orders2.placed", n)))
                .unwrap(),
        );
        tx.commit().unwrap();
    };
    let failures = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let f = failures.clone();
    let relay = outbox
        .relay_with(publisher.clone())
        .retry(RetryPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(500),
            multiplier: 2.0,
            jitter: 0.2,
            max_attempts: 1000,
        })
        .publish_timeout(Duration::from_secs(2))
        .poll_interval(Duration::from_millis(50))
        .observer(move |e: &outbox_core::Event<'_>| {
            if matches!(e, outbox_core::Event::Failed { .. }) {
                f.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        })
        .build()
        .unwrap();
    let running = outbox_core::conformance::RunningRelay::spawn(relay);
    write(0, 100);
    // Kill the server once some (not all) are in, write more while it is down, restart it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while s.info().await.unwrap().state.messages < 30 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.kill();
    write(100, 200);
    // The relay fails against the dead server (its publishes time out or are refused).
    let deadline = Instant::now() + Duration::from_secs(30);
    while failures.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "no publish failed while the server was down"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.restart();
    write(200, total);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let sent = store.stats().await.unwrap().total().sent;
        if sent == u64::from(total) {
            break;
        }
        assert!(Instant::now() < deadline, "{sent} of {total} sent");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let report = running.stop().await;
    let stored = s.info().await.unwrap().state.messages;
    let got = read(&s, stored).await;
    let ids: std::collections::HashSet<&String> = got.iter().map(|g| &g.0).collect();
    eprintln!(
        "nats restart: {total} messages, {stored} in the stream, {} distinct, {} failed attempts",
        ids.len(),
        report.failed
    );
    assert_eq!(ids.len(), total as usize, "every id arrived");
    assert_eq!(
        stored,
        u64::from(total),
        "the duplicate window absorbed every retry"
    );
    for k in ["k0", "k1", "k2"] {
        let ns: Vec<u32> = got.iter().filter(|g| g.1 == k).map(|g| g.2).collect();
        assert!(ns.windows(2).all(|w| w[0] < w[1]), "{k} out of order");
    }
    assert!(report.failed > 0, "the outage was seen");
}
