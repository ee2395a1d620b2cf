//! SQLite → HTTP webhooks (Standard Webhooks).
//!
//! Shows: messages committed with business rows, then POSTed by a relay with `webhook-id`
//! (the message id), `webhook-timestamp` and `webhook-signature` (HMAC-SHA256 with the
//! shared secret); the receiver checks each signature with `WebhookSecret::verify` and
//! de-duplicates on `webhook-id`. A receiver answering 503 once shows the retry. A small
//! local HTTP receiver stands in for the real one, so it runs with no services.
//!
//! Run: `cargo run --example webhook_relay --features webhook`

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox::sqlite::SqliteStore;
use outbox::webhook::{WebhookOptions, WebhookPublisher, WebhookSecret};
use outbox::{KeepOrder, Message, Outbox, RetryPolicy};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// The secret both sides hold (in production: from a secret store, never a flag).
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

#[derive(Default)]
struct Received {
    ids: HashSet<String>,
    bodies: Vec<String>,
    requests: usize,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (base_url, received) = receiver().await?;
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::open(dir.path().join("app.db"))?;
    store.migrate_now()?;
    let publisher = WebhookPublisher::new(WebhookOptions {
        base_url: Some(base_url),
        secrets: vec![WebhookSecret::parse(SECRET)?],
        timeout: Duration::from_secs(5),
        ..Default::default()
    })?;
    let outbox = Outbox::builder(store.clone(), publisher)
        .strategy(KeepOrder::default())
        .build()?;

    let mut conn = store.connect()?;
    conn.execute_batch("CREATE TABLE invoices (id INTEGER PRIMARY KEY, cents INTEGER)")?;
    let mut tx = conn.transaction()?;
    let mut after = outbox::AfterCommit::empty();
    for (id, cents) in [(1, 1250), (2, 990), (3, 4000)] {
        tx.execute("INSERT INTO invoices VALUES (?1, ?2)", (id, cents))?;
        after.merge(
            outbox.enqueue_blocking(
                &mut tx,
                [Message::json(
                    "invoices/issued",
                    &serde_json::json!({"invoice": id, "cents": cents}),
                )?
                .key(format!("invoice-{id}"))],
            )?,
        );
    }
    tx.commit()?;
    after.dispatch();

    let relay = outbox
        .relay()
        .retry(RetryPolicy {
            initial: Duration::from_millis(100),
            ..Default::default()
        })
        .build()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while received.lock().unwrap().ids.len() < 3 {
        if std::time::Instant::now() > deadline {
            return Err("the receiver did not get all three webhooks".into());
        }
        relay.run_once().await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = received.lock().unwrap();
    for body in &r.bodies {
        println!("received {body}");
    }
    println!(
        "{} webhooks delivered and verified in {} requests (one 503 retried)",
        r.ids.len(),
        r.requests
    );
    Ok(())
}

/// A receiver on 127.0.0.1: answers 503 to its first request, then checks the signature
/// (401 when it does not verify) and answers 204.
async fn receiver() -> std::io::Result<(String, Arc<Mutex<Received>>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}/hooks/", listener.local_addr()?);
    let received = Arc::new(Mutex::new(Received::default()));
    let shared = received.clone();
    let secret = WebhookSecret::parse(SECRET).expect("a valid secret");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (shared, secret) = (shared.clone(), secret.clone());
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                // One request per connection; the client opens another as needed.
                let mut headers = Vec::new();
                loop {
                    let mut line = String::new();
                    if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    if line == "\r\n" {
                        break;
                    }
                    if let Some((name, value)) = line.split_once(':') {
                        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
                    }
                }
                let header = |n: &str| {
                    headers
                        .iter()
                        .find(|(k, _)| k == n)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default()
                };
                let mut body = vec![0; header("content-length").parse().unwrap_or(0)];
                if stream.read_exact(&mut body).await.is_err() {
                    return;
                }
                let status = {
                    let mut r = shared.lock().unwrap();
                    r.requests += 1;
                    let timestamp = header("webhook-timestamp").parse().unwrap_or(0);
                    let id = header("webhook-id");
                    if r.requests == 1 {
                        "503 Service Unavailable"
                    } else if !secret.verify(&id, timestamp, &body, &header("webhook-signature")) {
                        "401 Unauthorized"
                    } else {
                        if r.ids.insert(id) {
                            r.bodies.push(String::from_utf8_lossy(&body).into_owned());
                        }
                        "204 No Content"
                    }
                };
                let response =
                    format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                let _ = stream.get_mut().write_all(response.as_bytes()).await;
            });
        }
    });
    Ok((base, received))
}
