//! `outbox relay --publisher http://…`: messages POSTed to the webhook with Standard Webhooks
//! headers, signed with the secrets from OUTBOX_WEBHOOK_SECRETS, which never reach the output.
//! `--publisher nats://…`: messages in a JetStream stream.

use outbox_core::StoreAdmin;
use std::io::{Read, Write};
use std::process::Command;

use outbox_core::{Message, Outbox, RelayOnly, Store};

#[tokio::test]
async fn relay_posts_signed_webhooks() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let store = outbox_sqlite::SqliteStore::open(&db).unwrap();
    store.migrate().await.unwrap();
    let outbox = Outbox::writer(store.clone())
        .strategy(RelayOnly)
        .build()
        .unwrap();
    let mut conn = store.connect().unwrap();
    let mut tx = conn.transaction().unwrap();
    drop(
        outbox
            .enqueue_blocking(
                &mut tx,
                [Message::new("orders/placed", b"{\"id\":1}".to_vec())],
            )
            .unwrap(),
    );
    tx.commit().unwrap();
    let id = store.get(1).await.unwrap().unwrap().envelope.id.to_string();

    // A receiver that takes one request and answers 204.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 8192];
        let mut got = Vec::new();
        while !String::from_utf8_lossy(&got).contains("{\"id\":1}") {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        s.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
            .unwrap();
        String::from_utf8_lossy(&got).to_lowercase()
    });
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let out = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .env_remove("OUTBOX_STORE")
        .env("OUTBOX_WEBHOOK_SECRETS", secret)
        .args([
            "--store",
            &format!("sqlite://{}", db.display()),
            "relay",
            "--publisher",
            &format!("http://127.0.0.1:{port}/hooks/"),
        ])
        .output()
        .unwrap();
    let request = server.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        request.starts_with("post /hooks/orders/placed http/1.1"),
        "{request}"
    );
    assert!(request.contains(&format!("webhook-id: {id}")), "{request}");
    assert!(request.contains("webhook-signature: v1,"), "{request}");
    assert!(request.contains("webhook-timestamp: "), "{request}");
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!output.contains("MfKQ9r8"), "the secret was printed");
    assert_eq!(store.stats().await.unwrap().total().sent, 1);

    // A bad secret is a configuration error (exit 2) that does not echo it.
    let out = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .env("OUTBOX_WEBHOOK_SECRETS", "whsec_!!not-base64-secret!!")
        .args([
            "--store",
            &format!("sqlite://{}", db.display()),
            "relay",
            "--publisher",
            "http://127.0.0.1:9/",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("not-base64-secret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_publishes_to_jetstream() {
    let server = outbox_testkit::NatsServer::start();
    let url = server.url();
    let p = outbox_nats::NatsPublisher::connect(&url).await.unwrap();
    let mut stream = p
        .jetstream()
        .create_stream(async_nats::jetstream::stream::Config {
            name: "cli".into(),
            subjects: vec!["cli.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let store = outbox_sqlite::SqliteStore::open(&db).unwrap();
    store.migrate().await.unwrap();
    let outbox = Outbox::writer(store.clone())
        .strategy(RelayOnly)
        .build()
        .unwrap();
    let mut conn = store.connect().unwrap();
    let mut tx = conn.transaction().unwrap();
    drop(
        outbox
            .enqueue_blocking(
                &mut tx,
                (0..3).map(|i| Message::new("cli.orders", vec![b'0' + i])),
            )
            .unwrap(),
    );
    tx.commit().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .env_remove("OUTBOX_STORE")
        .args([
            "--store",
            &format!("sqlite://{}", db.display()),
            "relay",
            "--publisher",
            &url,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stored = stream.info().await.unwrap().state.messages;
    drop(server);
    assert_eq!(stored, 3);
}
