//! A custom Publisher in a few lines: an HTTP webhook.
//!
//! Shows: implementing `Publisher` for any external system, classifying its errors (5xx and
//! connection errors are transient and retried with backoff; 4xx is permanent and
//! dead-lettered), and the relay retrying a webhook that fails once. A tiny local HTTP server
//! stands in for the webhook receiver, so it runs with no services.
//!
//! Run: `cargo run --example custom_publisher`

use outbox::StoreAdmin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use outbox::sqlite::SqliteStore;
use outbox::{async_trait, Envelope, Error, Message, Outbox, Publisher, RetryPolicy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// POSTs each message to `http://{host}/{destination}` with an idempotency key.
struct Webhook {
    host: String,
}

#[async_trait]
impl Publisher for Webhook {
    async fn publish(&self, env: &Envelope) -> outbox::Result<()> {
        let m = &env.message;
        let mut stream = tokio::net::TcpStream::connect(&self.host)
            .await
            .map_err(|e| Error::transient("webhook unreachable").with_source(e))?;
        let head = format!(
            "POST /{} HTTP/1.1\r\nHost: {}\r\nContent-Type: {}\r\nIdempotency-Key: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            m.destination, self.host, m.content_type, env.id, m.payload.len()
        );
        let io = |e: std::io::Error| Error::transient("webhook I/O").with_source(e);
        stream.write_all(head.as_bytes()).await.map_err(io)?;
        stream.write_all(&m.payload).await.map_err(io)?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.map_err(io)?;
        let status: u16 = response
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        match status {
            200..=299 => Ok(()),
            400..=499 => Err(Error::permanent(format!(
                "webhook rejected the message: {status}"
            ))),
            _ => Err(Error::transient(format!("webhook failed: {status}"))),
        }
    }
}

/// A receiver that answers 503 to the first request, then 200 (and 422 for /bad).
async fn receiver() -> std::io::Result<(String, Arc<AtomicUsize>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let n = h.fetch_add(1, Ordering::SeqCst);
            let mut buf = vec![0u8; 4096];
            let len = socket.read(&mut buf).await.unwrap_or(0);
            let request = String::from_utf8_lossy(&buf[..len]).into_owned();
            let status = if request.starts_with("POST /bad") {
                "422 Unprocessable Entity"
            } else if n == 0 {
                "503 Service Unavailable"
            } else {
                "200 OK"
            };
            println!(
                "  receiver: {} -> {status}",
                request.lines().next().unwrap_or("")
            );
            let _ = socket
                .write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                .await;
        }
    });
    Ok((addr, hits))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (host, hits) = receiver().await?;
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::open(dir.path().join("app.db"))?;
    store.migrate_now()?;
    let retry = RetryPolicy {
        initial: Duration::from_millis(50),
        ..Default::default()
    };
    let outbox = Outbox::builder(store.clone(), Webhook { host })
        .retry(retry)
        .build()?;

    let mut conn = store.connect()?;
    let mut tx = conn.transaction()?;
    let msgs = [
        Message::json("hooks/order-paid", &serde_json::json!({"order": 1}))?,
        Message::json("bad", &serde_json::json!({"order": "not a number"}))?,
    ];
    let after = outbox.enqueue_blocking(&mut tx, msgs)?;
    tx.commit()?;
    println!("on commit: {:?}", after.publish().await);

    let relay = outbox.relay().build()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while store.stats().await?.total().pending > 0 {
        if std::time::Instant::now() > deadline {
            return Err("the relay did not finish within 30 s".into());
        }
        tokio::time::sleep(Duration::from_millis(60)).await; // the backoff
        println!("relay: {:?}", relay.run_once().await?);
    }
    let t = store.stats().await?.total();
    println!(
        "receiver got {} requests; outbox: sent={} dead={}",
        hits.load(Ordering::SeqCst),
        t.sent,
        t.dead
    );
    Ok(())
}
