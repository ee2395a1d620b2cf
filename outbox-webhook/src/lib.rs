//! HTTP webhook publisher following the [Standard Webhooks](https://www.standardwebhooks.com/)
//! convention: each message is a `POST` of its payload to its destination (a URL, or a path
//! under a base URL) with `webhook-id` (the message id: receivers de-duplicate on it),
//! `webhook-timestamp` (seconds) and `webhook-signature` (`v1,` + base64 HMAC-SHA256 of
//! `{id}.{timestamp}.{body}`, one per secret, space separated, so secrets can be rotated).
//!
//! Classification: 2xx is success; 408, 429 and 5xx are transient (a `Retry-After` in seconds
//! is honoured by the relay), as are timeouts and connection errors; any other status is
//! permanent (dead-lettered). Connections are kept and reused.
//!
//! ```no_run
//! use outbox_webhook::{WebhookOptions, WebhookPublisher, WebhookSecret};
//! # fn demo() -> outbox_core::Result<()> {
//! let publisher = WebhookPublisher::new(WebhookOptions {
//!     base_url: Some("https://hooks.example.com/outbox/".into()),
//!     secrets: vec![WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")?],
//!     ..Default::default()
//! })?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::fmt;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use base64::Engine as _;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::{HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use outbox_core::{Envelope, Error, ErrorKind, Publisher, Retry};
use sha2::Sha256;

/// A signing secret: `whsec_` + base64 (the Standard Webhooks form), or any other text taken
/// as its bytes. Never printed.
#[derive(Clone)]
pub struct WebhookSecret(Vec<u8>);

impl WebhookSecret {
    /// Parse `whsec_<base64>`, or take other text as the key bytes (at least 16).
    pub fn parse(text: &str) -> outbox_core::Result<Self> {
        let text = text.trim();
        let bytes = match text.strip_prefix("whsec_") {
            Some(b64) => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|_| Error::config("webhook secret: whsec_ must be followed by base64"))?,
            None => text.as_bytes().to_vec(),
        };
        if bytes.len() < 16 {
            return Err(Error::config(
                "webhook secret: at least 16 bytes (24 base64 characters after whsec_)",
            ));
        }
        Ok(Self(bytes))
    }

    fn mac(&self, id: &str, timestamp: u64, body: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// For a receiver: whether the `webhook-signature` header value holds a `v1,` signature
    /// of (`webhook-id`, `webhook-timestamp`, body) made with this secret (compared in
    /// constant time). Check the timestamp's age yourself (Standard Webhooks suggests
    /// refusing those more than 5 minutes off) to refuse replays.
    pub fn verify(&self, id: &str, timestamp: u64, body: &[u8], signature_header: &str) -> bool {
        signature_header.split(' ').any(|sig| {
            let Some(b64) = sig.strip_prefix("v1,") else {
                return false;
            };
            let Ok(expected) = base64::engine::general_purpose::STANDARD.decode(b64) else {
                return false;
            };
            self.mac(id, timestamp, body)
                .verify_slice(&expected)
                .is_ok()
        })
    }
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSecret(<redacted>)")
    }
}

/// Settings of a [`WebhookPublisher`].
#[derive(Debug, Clone)]
pub struct WebhookOptions {
    /// Destinations that are not absolute URLs are paths under this URL.
    pub base_url: Option<String>,
    /// Signing secrets; every one signs (rotation: receivers accept any). None: unsigned.
    pub secrets: Vec<WebhookSecret>,
    /// Deadline of one request, response included. Default: 10 s.
    pub timeout: Duration,
    /// Largest response body read (the rest is dropped). Default: 64 KiB.
    pub max_response_bytes: usize,
}

impl Default for WebhookOptions {
    fn default() -> Self {
        Self {
            base_url: None,
            secrets: Vec::new(),
            timeout: Duration::from_secs(10),
            max_response_bytes: 64 * 1024,
        }
    }
}

#[cfg(feature = "tls")]
type Connector = hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;
#[cfg(not(feature = "tls"))]
type Connector = hyper_util::client::legacy::connect::HttpConnector;

/// Posts messages to HTTP endpoints (see the crate documentation).
pub struct WebhookPublisher {
    client: Client<Connector, Full<Bytes>>,
    base: Option<String>,
    secrets: Vec<WebhookSecret>,
    timeout: Duration,
    max_response_bytes: usize,
}

impl fmt::Debug for WebhookPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookPublisher")
            .field("base", &self.base.as_deref().map(outbox_core::redact_url))
            .field("secrets", &self.secrets.len())
            .finish_non_exhaustive()
    }
}

impl WebhookPublisher {
    /// A publisher; a malformed base URL is a `Config` error.
    pub fn new(options: WebhookOptions) -> outbox_core::Result<Self> {
        if let Some(base) = &options.base_url {
            let uri: Uri = base.parse().map_err(|_| {
                Error::config(format!(
                    "webhook base URL {} is not a URL",
                    outbox_core::redact_url(base)
                ))
            })?;
            match uri.scheme_str() {
                Some("http") => {}
                Some("https") if cfg!(feature = "tls") => {}
                Some("https") => {
                    return Err(Error::config(
                        "https webhooks need the outbox-webhook feature `tls`",
                    ))
                }
                _ => {
                    return Err(Error::config(
                        "webhook base URL must start with http:// or https://",
                    ))
                }
            }
        }
        if options.timeout.is_zero() {
            return Err(Error::config("webhook timeout must be positive"));
        }
        Ok(Self {
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(60))
                .build(connector()?),
            base: options.base_url,
            secrets: options.secrets,
            timeout: options.timeout,
            max_response_bytes: options.max_response_bytes,
        })
    }

    /// The URL a destination is posted to.
    pub fn url_for(&self, destination: &str) -> outbox_core::Result<Uri> {
        let text = if destination.starts_with("http://") || destination.starts_with("https://") {
            destination.to_owned()
        } else {
            match &self.base {
                Some(base) => format!(
                    "{}/{}",
                    base.trim_end_matches('/'),
                    destination.trim_start_matches('/')
                ),
                None => {
                    return Err(Error::new(
                        ErrorKind::Unroutable,
                        Retry::Permanent,
                        format!("destination {destination:?} is not a URL and no base URL is set"),
                    ))
                }
            }
        };
        text.parse::<Uri>().map_err(|_| {
            Error::new(
                ErrorKind::Unroutable,
                Retry::Permanent,
                format!(
                    "destination {:?} does not make a URL",
                    destination.chars().take(64).collect::<String>()
                ),
            )
        })
    }

    /// The `webhook-signature` value for one message.
    pub fn signature(&self, id: &str, timestamp: u64, body: &[u8]) -> Option<String> {
        if self.secrets.is_empty() {
            return None;
        }
        let signed: Vec<String> = self
            .secrets
            .iter()
            .map(|s| {
                format!(
                    "v1,{}",
                    base64::engine::general_purpose::STANDARD
                        .encode(s.mac(id, timestamp, body).finalize().into_bytes())
                )
            })
            .collect();
        Some(signed.join(" "))
    }
}

#[cfg(feature = "tls")]
fn connector() -> outbox_core::Result<Connector> {
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()
        .map_err(|e| Error::config("webhook: cannot load the system's CA roots").with_source(e))?
        .https_or_http()
        .enable_http1()
        .build())
}

#[cfg(not(feature = "tls"))]
fn connector() -> outbox_core::Result<Connector> {
    Ok(hyper_util::client::legacy::connect::HttpConnector::new())
}

fn transient(message: String) -> Error {
    Error::new(ErrorKind::Publish, Retry::Transient, message)
}

/// `Retry-After` in seconds (an HTTP date is not honoured: the relay's backoff applies).
fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    let secs: u64 = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs.min(24 * 3600)))
}

#[async_trait]
impl Publisher for WebhookPublisher {
    async fn publish(&self, envelope: &Envelope) -> outbox_core::Result<()> {
        let m = &envelope.message;
        let uri = self.url_for(&m.destination)?;
        let id = envelope.id.to_string();
        let timestamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(uri.clone())
            .header(http::header::USER_AGENT, "outbox-webhook")
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string());
        if let Ok(ct) = HeaderValue::from_str(&m.content_type) {
            request = request.header(http::header::CONTENT_TYPE, ct);
        }
        if let Some(sig) = self.signature(&id, timestamp, &m.payload) {
            request = request.header("webhook-signature", sig);
        }
        for (name, value) in &m.headers {
            let lower = name.to_ascii_lowercase();
            if lower.starts_with("webhook-") || lower == "host" || lower == "content-length" {
                continue; // set here, or by the connection
            }
            let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_bytes(value.as_bytes()),
            ) else {
                return Err(Error::new(
                    ErrorKind::Publish,
                    Retry::Permanent,
                    format!("header {name:?} cannot be sent over HTTP"),
                ));
            };
            request = request.header(n, v);
        }
        let request = request
            .body(Full::new(Bytes::copy_from_slice(&m.payload)))
            .map_err(|e| Error::permanent("cannot build the webhook request").with_source(e))?;
        let where_ = outbox_core::redact_url(&uri.to_string());
        let exchange = async {
            let response =
                self.client.request(request).await.map_err(|e| {
                    transient(format!("webhook {where_} unreachable")).with_source(e)
                })?;
            let status = response.status();
            let after = retry_after(response.headers());
            // Read (a bounded part of) the body so that the connection can be reused.
            let body = Limited::new(response.into_body(), self.max_response_bytes)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            Ok::<_, Error>((status, after, body))
        };
        let (status, after, body) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| {
                Error::new(
                    ErrorKind::Timeout,
                    Retry::Transient,
                    format!("webhook {where_} did not answer within {:?}", self.timeout),
                )
            })??;
        if status.is_success() {
            return Ok(());
        }
        let said: String = String::from_utf8_lossy(&body).chars().take(200).collect();
        let message = format!("webhook {where_} answered {status}: {said}");
        let transient_status = status == StatusCode::REQUEST_TIMEOUT
            || status == StatusCode::TOO_MANY_REQUESTS
            || status.is_server_error();
        if transient_status {
            let e = transient(message);
            Err(match after {
                Some(d) => e.with_retry_after(d),
                None => e,
            })
        } else {
            Err(Error::new(ErrorKind::Publish, Retry::Permanent, message))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Standard Webhooks specification's example: secret, id, timestamp, body, signature.
    #[test]
    fn signs_like_the_specification() {
        let p = WebhookPublisher::new(WebhookOptions {
            secrets: vec![WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap()],
            ..Default::default()
        })
        .unwrap();
        let sig = p
            .signature(
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                br#"{"test": 2432232314}"#,
            )
            .unwrap();
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(WebhookSecret::parse("short").is_err());
        assert!(WebhookSecret::parse("whsec_not base64!").is_err());
        assert!(
            !format!("{:?}", WebhookSecret::parse("0123456789abcdef").unwrap()).contains("0123")
        );
    }

    #[test]
    fn receivers_verify_with_any_of_the_signatures() {
        let secret = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let (id, ts, body) = (
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            &br#"{"test": 2432232314}"#[..],
        );
        let good = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
        assert!(secret.verify(id, ts, body, good));
        assert!(secret.verify(id, ts, body, &format!("v1,bm9wZQ== {good}")));
        assert!(
            !secret.verify(id, ts + 1, body, good),
            "timestamp is signed"
        );
        assert!(!secret.verify(id, ts, b"{}", good), "body is signed");
        assert!(!secret.verify("msg_other", ts, body, good), "id is signed");
        for bad in [
            "",
            "v1,",
            "v1,not base64!",
            "v2,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        ] {
            assert!(!secret.verify(id, ts, body, bad), "{bad:?}");
        }
    }

    #[test]
    fn destinations_and_bad_settings() {
        let p = WebhookPublisher::new(WebhookOptions {
            base_url: Some("http://127.0.0.1:9/hooks/".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            p.url_for("orders/placed").unwrap().to_string(),
            "http://127.0.0.1:9/hooks/orders/placed"
        );
        assert_eq!(
            p.url_for("https://other.example/x").unwrap().to_string(),
            "https://other.example/x"
        );
        let bare = WebhookPublisher::new(WebhookOptions::default()).unwrap();
        assert_eq!(
            bare.url_for("orders").unwrap_err().kind(),
            ErrorKind::Unroutable
        );
        for base in ["ftp://x", "not a url"] {
            let e = WebhookPublisher::new(WebhookOptions {
                base_url: Some(base.into()),
                ..Default::default()
            })
            .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Config, "{base}");
        }
    }
}
