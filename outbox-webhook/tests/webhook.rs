//! The webhook publisher against a local receiver that verifies every signature (with the
//! older of two rotated secrets) and injects each failure class, through a real relay on
//! SQLite: success, 5xx, 408 and 429 (its Retry-After honoured) and a timeout retried, other
//! 4xx dead-lettered at once, connections reused.

use outbox_core::StoreAdmin;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use outbox_core::{Message, Outbox, RelayOnly, RetryPolicy, Status, Store};
use outbox_webhook::{WebhookOptions, WebhookPublisher, WebhookSecret};
use sha2::Sha256;

const OLD: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const NEW: &str = "whsec_dGhlIG5ldyBzZWNyZXQgb2YgdGhlIHdlYmhvb2s=";

#[derive(Default)]
struct Seen {
    /// Path -> when each request came.
    hits: HashMap<String, Vec<Instant>>,
    /// webhook-ids answered 2xx.
    delivered: Vec<(String, String)>,
    bad_signatures: usize,
    peers: std::collections::HashSet<SocketAddr>,
    requests: usize,
}

type Shared = Arc<Mutex<Seen>>;

fn verify(headers: &HeaderMap, body: &[u8]) -> bool {
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("");
    let key = base64::engine::general_purpose::STANDARD
        .decode(OLD.trim_start_matches("whsec_"))
        .unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{}.{}.", h("webhook-id"), h("webhook-timestamp")).as_bytes());
    mac.update(body);
    let expected = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    );
    h("webhook-signature").split(' ').any(|s| s == expected)
}

async fn receive(
    State(seen): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(path): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let nth = {
        let mut s = seen.lock().unwrap();
        s.requests += 1;
        s.peers.insert(peer);
        if !verify(&headers, &body) {
            s.bad_signatures += 1;
        }
        let hits = s.hits.entry(path.clone()).or_default();
        hits.push(Instant::now());
        hits.len()
    };
    let first = nth == 1;
    let reply = match path.as_str() {
        "flaky" if first => StatusCode::SERVICE_UNAVAILABLE.into_response(),
        "slow-once" if first => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            StatusCode::OK.into_response()
        }
        "request-timeout" if first => StatusCode::REQUEST_TIMEOUT.into_response(),
        "limited" if first => (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", "2")],
            "slow down",
        )
            .into_response(),
        "gone" => (StatusCode::GONE, "no such hook").into_response(),
        "bad" => (StatusCode::BAD_REQUEST, "malformed").into_response(),
        _ => StatusCode::NO_CONTENT.into_response(),
    };
    if reply.status().is_success() {
        let id = headers
            .get("webhook-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        seen.lock().unwrap().delivered.push((path, id));
    }
    reply
}

async fn receiver() -> (String, Shared) {
    let seen: Shared = Arc::default();
    let app = axum::Router::new()
        .route("/hooks/{path}", axum::routing::post(receive))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    (format!("http://{addr}/hooks/"), seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failure_class_through_a_relay() {
    let (base, seen) = receiver().await;
    let publisher = WebhookPublisher::new(WebhookOptions {
        base_url: Some(base),
        secrets: vec![
            WebhookSecret::parse(NEW).unwrap(),
            WebhookSecret::parse(OLD).unwrap(),
        ],
        timeout: Duration::from_millis(500),
        ..Default::default()
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = outbox_sqlite::SqliteStore::open(dir.path().join("app.db")).unwrap();
    store.migrate().await.unwrap();
    let outbox = Outbox::writer(store.clone())
        .strategy(RelayOnly)
        .build()
        .unwrap();
    let paths = [
        "ok",
        "flaky",
        "slow-once",
        "request-timeout",
        "limited",
        "gone",
        "bad",
    ];
    let mut conn = store.connect().unwrap();
    let mut tx = conn.transaction().unwrap();
    let after = outbox
        .enqueue_blocking(
            &mut tx,
            paths.iter().map(|p| {
                Message::new(
                    *p,
                    serde_json::to_vec(&serde_json::json!({ "to": p })).unwrap(),
                )
                .content_type("application/json")
                .header("x-tenant", "t1")
            }),
        )
        .unwrap();
    tx.commit().unwrap();
    after.dispatch();
    let relay = outbox
        .relay_with(publisher)
        .retry(RetryPolicy {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(200),
            multiplier: 2.0,
            jitter: 0.0,
            max_attempts: 5,
        })
        .lease(Duration::from_secs(5))
        .publish_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        relay.run_once().await.unwrap();
        let delivered = seen.lock().unwrap().delivered.len();
        if delivered >= 5 {
            break;
        }
        assert!(Instant::now() < deadline, "delivered {delivered} of 5");
        store.wait_for_work(Duration::from_millis(50)).await;
    }
    // The receiver's record, taken out of its lock.
    let s = std::mem::take(&mut *seen.lock().unwrap());
    assert_eq!(
        s.bad_signatures, 0,
        "every request verifies with the old secret"
    );
    let delivered: Vec<&str> = s.delivered.iter().map(|(p, _)| p.as_str()).collect();
    for p in ["ok", "flaky", "slow-once", "request-timeout", "limited"] {
        assert!(delivered.contains(&p), "{p} not delivered: {delivered:?}");
    }
    // Retry-After: 2 honoured over the 50 ms backoff.
    let limited = &s.hits["limited"];
    assert!(
        limited[1] - limited[0] >= Duration::from_millis(1900),
        "{:?}",
        limited[1] - limited[0]
    );
    // Permanent failures: one request each, dead-lettered.
    assert_eq!(s.hits["gone"].len(), 1);
    assert_eq!(s.hits["bad"].len(), 1);
    eprintln!(
        "webhook: {} requests over {} connections",
        s.requests,
        s.peers.len()
    );
    // Connections are reused: fewer connections than requests.
    assert!(
        s.peers.len() < s.requests,
        "{} connections for {} requests",
        s.peers.len(),
        s.requests
    );
    let dead = store.dead_letters(None, 10).await.unwrap();
    let mut dead: Vec<String> = dead
        .iter()
        .map(|m| m.envelope.message.destination.clone())
        .collect();
    dead.sort();
    assert_eq!(dead, ["bad", "gone"]);
    let gone = store
        .dead_letters(None, 10)
        .await
        .unwrap()
        .into_iter()
        .find(|m| m.envelope.message.destination == "gone")
        .unwrap();
    assert_eq!(gone.status, Status::Dead);
    let error = gone.last_error.unwrap();
    assert!(error.contains("answered 410 Gone"), "{error}");
    // Only the status and reason: not the receiver's body, not the URL's path.
    assert!(!error.contains("no such hook"), "{error}");
    assert!(!error.contains("/hooks/gone"), "{error}");
}

fn envelope(destination: &str) -> outbox_core::Envelope {
    outbox_core::Envelope {
        id: outbox_core::MessageId::new(),
        created_at: std::time::SystemTime::now(),
        message: Message::new(destination, b"{}".to_vec()),
    }
}

/// Server-side request forgery: with a base URL, a destination cannot leave it (another host
/// or port, `..` segments); loopback, private, link-local and unspecified addresses are
/// refused unless the host is the base URL's or allowed, including names that resolve to
/// them (checked where the connection is made); a refusal is permanent and sends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_go_only_where_they_may() {
    use outbox_core::{ErrorKind, Publisher as _};
    let (base, seen) = receiver().await;
    let port = base
        .trim_start_matches("http://127.0.0.1:")
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let based = WebhookPublisher::new(WebhookOptions {
        base_url: Some(base.clone()),
        ..Default::default()
    })
    .unwrap();
    assert!(based.url_for("ok").is_ok());
    assert!(based
        .url_for(&format!("http://127.0.0.1:{port}/hooks/ok"))
        .is_ok());
    for bad in [
        "https://attacker.example/collect".to_owned(),
        format!(
            "http://127.0.0.1:{}/hooks/ok",
            port.parse::<u16>().unwrap() - 1
        ),
        "http://169.254.169.254/latest/meta-data".to_owned(),
        "../admin".to_owned(),
        "a/../../admin".to_owned(),
        "a/%2E%2e/admin".to_owned(),
        "./ok".to_owned(),
    ] {
        let e = based.url_for(&bad).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unroutable, "{bad}: {e}");
        let e = based.publish(&envelope(&bad)).await.unwrap_err();
        assert!(!e.is_transient(), "{bad}: {e}");
    }
    // No base URL, no list: full URLs, but not to private addresses.
    let open = WebhookPublisher::new(WebhookOptions::default()).unwrap();
    assert!(open.url_for("https://93.184.216.34/hook").is_ok());
    for bad in [
        "http://127.0.0.1:1/x",
        "http://[::1]:1/x",
        "http://10.1.2.3/x",
        "http://192.168.0.1/x",
        "http://100.64.0.1/x",
        "http://169.254.169.254/x",
        "http://0.0.0.0/x",
        "http://[fd00::1]/x",
        "http://[::ffff:127.0.0.1]/x",
    ] {
        let e = open.url_for(bad).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unroutable, "{bad}: {e}");
    }
    // A name that resolves to loopback: refused when connecting, permanently, nothing sent.
    let by_name = format!("http://localhost:{port}/hooks/ok");
    let e = open.publish(&envelope(&by_name)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unroutable, "{e}");
    assert!(
        !e.is_transient() && e.to_string().contains("loopback"),
        "{e}"
    );
    assert_eq!(seen.lock().unwrap().requests, 0, "a request was sent");
    // Allowed by name, or every private network allowed: sent.
    for allowed in [
        WebhookOptions {
            allowed_hosts: vec!["LocalHost".into()],
            ..Default::default()
        },
        WebhookOptions {
            allow_private_networks: true,
            ..Default::default()
        },
    ] {
        let p = WebhookPublisher::new(allowed).unwrap();
        p.publish(&envelope(&by_name)).await.unwrap();
    }
    assert_eq!(seen.lock().unwrap().requests, 2);
    // With a base URL and a list, a listed host may be named in full.
    let listed = WebhookPublisher::new(WebhookOptions {
        base_url: Some(base),
        allowed_hosts: vec!["localhost".into()],
        ..Default::default()
    })
    .unwrap();
    listed.publish(&envelope(&by_name)).await.unwrap();
    assert!(listed.url_for("https://attacker.example/x").is_err());
}
