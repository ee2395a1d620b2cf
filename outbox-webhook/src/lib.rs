//! HTTP webhook publisher following the [Standard Webhooks](https://www.standardwebhooks.com/)
//! convention: each message is a `POST` of its payload to its destination (a URL, or a path
//! under a base URL) with `webhook-id` (the message id: receivers de-duplicate on it),
//! `webhook-timestamp` (seconds) and `webhook-signature` (`v1,` + base64 HMAC-SHA256 of
//! `{id}.{timestamp}.{body}`, one per secret, space separated, so secrets can be rotated).
//!
//! Where requests may go: a destination that is a path goes under the base URL (`.` and
//! `..` segments are refused); a destination that is a full URL must name the base URL's
//! host or one of [`WebhookOptions::allowed_hosts`] when either is set. Loopback, private,
//! link-local, shared and unspecified addresses are refused (checked on the addresses a
//! name resolves to, at connection time) unless the host is the base URL's or an allowed
//! one, or [`WebhookOptions::allow_private_networks`] is set. Errors name the endpoint by
//! scheme, host and port only (a path can be a secret, as Slack's are) and a refusal's body
//! is not kept: only its status and reason.
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

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
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
    /// Hosts (names or addresses, without port) a destination that is a full URL may name,
    /// besides the base URL's. Listed hosts may also be on private networks.
    pub allowed_hosts: Vec<String>,
    /// Allow every host on loopback, private, link-local and shared networks (default: only
    /// the base URL's host and the allowed ones).
    pub allow_private_networks: bool,
}

impl Default for WebhookOptions {
    fn default() -> Self {
        Self {
            base_url: None,
            secrets: Vec::new(),
            timeout: Duration::from_secs(10),
            max_response_bytes: 64 * 1024,
            allowed_hosts: Vec::new(),
            allow_private_networks: false,
        }
    }
}

type Http = hyper_util::client::legacy::connect::HttpConnector<GuardedResolver>;
#[cfg(feature = "tls")]
type Connector = hyper_rustls::HttpsConnector<Http>;
#[cfg(not(feature = "tls"))]
type Connector = Http;

/// Posts messages to HTTP endpoints (see the crate documentation).
pub struct WebhookPublisher {
    client: Client<Connector, Full<Bytes>>,
    base: Option<String>,
    secrets: Vec<WebhookSecret>,
    timeout: Duration,
    max_response_bytes: usize,
    /// The base URL's authority (`host:port`, as given).
    base_authority: Option<String>,
    /// `allowed_hosts` (lower case): full-URL destinations may name them.
    allowed: HashSet<String>,
    /// The allowed hosts and the base URL's: they may be on private networks.
    trusted: Arc<HashSet<String>>,
    allow_private: bool,
}

impl fmt::Debug for WebhookPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookPublisher")
            .field(
                "base",
                &self
                    .base
                    .as_deref()
                    .and_then(|b| b.parse::<Uri>().ok())
                    .map(|u| Self::endpoint(&u)),
            )
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
        let base_uri = options
            .base_url
            .as_deref()
            .and_then(|b| b.parse::<Uri>().ok());
        let allowed: HashSet<String> = options
            .allowed_hosts
            .iter()
            .map(|h| bare_host(h.trim()).to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect();
        let mut trusted = allowed.clone();
        if let Some(h) = base_uri.as_ref().and_then(|u| u.host()) {
            trusted.insert(bare_host(h).to_ascii_lowercase());
        }
        let trusted = Arc::new(trusted);
        let resolver = GuardedResolver {
            inner: hyper_util::client::legacy::connect::dns::GaiResolver::new(),
            trusted: trusted.clone(),
            allow_private: options.allow_private_networks,
        };
        Ok(Self {
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(60))
                .build(connector(resolver)?),
            base_authority: base_uri.as_ref().and_then(authority),
            base: options.base_url,
            secrets: options.secrets,
            timeout: options.timeout,
            max_response_bytes: options.max_response_bytes,
            allowed,
            trusted,
            allow_private: options.allow_private_networks,
        })
    }

    /// The URL a destination is posted to; a destination that would leave the places this
    /// publisher may post to is a permanent `Unroutable` error (see the crate documentation).
    pub fn url_for(&self, destination: &str) -> outbox_core::Result<Uri> {
        let refuse = |why: String| {
            Error::new(
                ErrorKind::Unroutable,
                Retry::Permanent,
                format!(
                    "destination {:?} {why}",
                    destination.chars().take(64).collect::<String>()
                ),
            )
        };
        let absolute = destination.starts_with("http://") || destination.starts_with("https://");
        let text = if absolute {
            destination.to_owned()
        } else {
            match &self.base {
                Some(base) => format!(
                    "{}/{}",
                    base.trim_end_matches('/'),
                    destination.trim_start_matches('/')
                ),
                None => return Err(refuse("is not a URL and no base URL is set".to_owned())),
            }
        };
        let uri = text
            .parse::<Uri>()
            .map_err(|_| refuse("does not make a URL".to_owned()))?;
        let dots = uri.path().split('/').any(|segment| {
            let s = segment.to_ascii_lowercase().replace("%2e", ".");
            s == "." || s == ".."
        });
        if dots {
            return Err(refuse("has a '.' or '..' path segment".to_owned()));
        }
        let host = uri.host().map(bare_host).unwrap_or("").to_ascii_lowercase();
        if absolute {
            let same_as_base =
                self.base_authority.is_some() && authority(&uri) == self.base_authority;
            let listed = self.allowed.contains(&host);
            // No base URL and no list: full URLs are how destinations are named.
            let open = self.base.is_none() && self.allowed.is_empty();
            if !(same_as_base || listed || open) {
                return Err(refuse(format!(
                    "names host {host:?}, which is neither the base URL's nor an allowed host (allowed_hosts)"
                )));
            }
        } else if authority(&uri) != self.base_authority {
            return Err(refuse("leaves the base URL".to_owned()));
        }
        // An address in the URL itself is not resolved: check it here.
        if let Ok(ip) = host.parse::<IpAddr>() {
            if !self.allow_private && !self.trusted.contains(&host) && !public(ip) {
                return Err(refuse(format!(
                    "is on a {} address (allow_private_networks or allowed_hosts to permit it)",
                    kind_of(ip)
                )));
            }
        }
        Ok(uri)
    }

    /// How errors name an endpoint: scheme, host and port (a path or query can be a secret).
    fn endpoint(uri: &Uri) -> String {
        format!(
            "{}://{}{}",
            uri.scheme_str().unwrap_or("http"),
            authority(uri).unwrap_or_default(),
            if uri.path().len() > 1 || uri.query().is_some() {
                "/…"
            } else {
                ""
            }
        )
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
fn connector(resolver: GuardedResolver) -> outbox_core::Result<Connector> {
    let mut http = Http::new_with_resolver(resolver);
    http.enforce_http(false);
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()
        .map_err(|e| Error::config("webhook: cannot load the system's CA roots").with_source(e))?
        .https_or_http()
        .enable_http1()
        .wrap_connector(http))
}

#[cfg(not(feature = "tls"))]
fn connector(resolver: GuardedResolver) -> outbox_core::Result<Connector> {
    Ok(Http::new_with_resolver(resolver))
}

/// A host without the brackets of an IPv6 literal.
fn bare_host(host: &str) -> &str {
    host.trim_start_matches('[').trim_end_matches(']')
}

/// `host:port` of a URL (the scheme's port when none is given), without user information.
fn authority(uri: &Uri) -> Option<String> {
    let host = uri.host()?.to_ascii_lowercase();
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    Some(format!("{host}:{port}"))
}

/// Whether an address is on the public internet: not loopback, private (RFC 1918, unique
/// local), link-local, shared (100.64/10), unspecified, broadcast or multicast.
fn public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || a == 0
                || (a == 100 && (64..128).contains(&b)))
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => public(IpAddr::V4(v4)),
            None => {
                !(v6.is_loopback()
                    || v6.is_unspecified()
                    || v6.is_multicast()
                    || v6.is_unique_local()
                    || v6.is_unicast_link_local())
            }
        },
    }
}

fn kind_of(ip: IpAddr) -> &'static str {
    if ip.is_loopback() {
        "loopback"
    } else if ip.is_unspecified() {
        "unspecified"
    } else {
        "private, link-local or shared"
    }
}

/// The refusal [`GuardedResolver`] returns (found again in the connection error's sources).
#[derive(Debug)]
struct PrivateAddress(String);

impl fmt::Display for PrivateAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PrivateAddress {}

/// Resolves names as the system does, then refuses a name of an untrusted host that
/// resolves to a non-public address. Checked here, where the connection is made, so a name
/// that resolves differently the second time (DNS rebinding) gains nothing.
#[derive(Clone)]
struct GuardedResolver {
    inner: hyper_util::client::legacy::connect::dns::GaiResolver,
    trusted: Arc<HashSet<String>>,
    allow_private: bool,
}

type Resolving =
    Pin<Box<dyn Future<Output = std::io::Result<std::vec::IntoIter<SocketAddr>>> + Send>>;

impl tower_service::Service<hyper_util::client::legacy::connect::dns::Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Resolving;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, name: hyper_util::client::legacy::connect::dns::Name) -> Self::Future {
        let host = name.as_str().to_ascii_lowercase();
        let checked = !self.allow_private && !self.trusted.contains(&host);
        let resolving = self.inner.call(name);
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = resolving.await?.collect();
            if checked {
                if let Some(a) = addrs.iter().find(|a| !public(a.ip())) {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::PermissionDenied,
                        PrivateAddress(format!(
                            "{host:?} resolves to a {} address (allow_private_networks or allowed_hosts to permit it)",
                            kind_of(a.ip())
                        )),
                    ));
                }
            }
            Ok(addrs.into_iter())
        })
    }
}

/// The resolver's refusal, if that is why a request failed.
fn refused_address(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(p) = c.downcast_ref::<PrivateAddress>() {
            return Some(p.0.clone());
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if let Some(p) = io
                .get_ref()
                .and_then(|i| i.downcast_ref::<PrivateAddress>())
            {
                return Some(p.0.clone());
            }
        }
        cause = c.source();
    }
    None
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
        let where_ = Self::endpoint(&uri);
        let exchange = async {
            let response =
                self.client
                    .request(request)
                    .await
                    .map_err(|e| match refused_address(&e) {
                        Some(why) => Error::new(
                            ErrorKind::Unroutable,
                            Retry::Permanent,
                            format!("webhook {where_} refused: {why}"),
                        ),
                        None => transient(format!("webhook {where_} unreachable")).with_source(e),
                    })?;
            let status = response.status();
            let after = retry_after(response.headers());
            // Read (a bounded part of) the body so that the connection can be reused; it is
            // not kept (a receiver's answer can echo secrets or personal data).
            let _ = Limited::new(response.into_body(), self.max_response_bytes)
                .collect()
                .await;
            Ok::<_, Error>((status, after))
        };
        let (status, after) = tokio::time::timeout(self.timeout, exchange)
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
        let message = format!("webhook {where_} answered {status}");
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
            p.url_for("https://other.example/x").unwrap_err().kind(),
            ErrorKind::Unroutable,
            "a base URL set: another host is refused"
        );
        assert_eq!(
            p.url_for("http://127.0.0.1:9/hooks/x").unwrap().to_string(),
            "http://127.0.0.1:9/hooks/x"
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
