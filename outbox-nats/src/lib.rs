//! NATS JetStream publisher: each message is published to the JetStream subject named by its
//! destination and its publish acknowledgement awaited; `Nats-Msg-Id` is the message id, so
//! the stream's duplicate window drops what a relay publishes again after a crash or a lost
//! acknowledgement. Headers `outbox-id`, `outbox-stream`, `outbox-key` (when set),
//! `content-type`, plus the message's own.
//!
//! Classification: no stream for the subject is permanent (`Unroutable`: the message is
//! dead-lettered, not retried forever); a timeout, a broken connection or any other failure
//! is transient. The client reconnects by itself.
//!
//! ```no_run
//! # async fn demo() -> outbox_core::Result<()> {
//! let publisher = outbox_nats::NatsPublisher::connect("nats://127.0.0.1:4222").await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod source;
pub use source::NatsSource;

use std::time::Duration;

/// The async-nats this publisher is built with (streams, consumers, the client).
pub use async_nats;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage as Publish;
use async_trait::async_trait;
use bytes::Bytes;
use outbox_core::{redact_url, Envelope, Error, ErrorKind, Publisher, Retry};

/// Publishes to NATS JetStream (see the crate documentation).
#[derive(Clone)]
pub struct NatsPublisher {
    client: async_nats::Client,
    jetstream: async_nats::jetstream::Context,
}

impl std::fmt::Debug for NatsPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsPublisher").finish_non_exhaustive()
    }
}

impl NatsPublisher {
    /// Connect to `nats://host:4222`. Credentials: `nats://user:password@host`, a token as
    /// `nats://TOKEN@host`, or files named in the query: `?creds=/path/user.creds` (a JWT and
    /// nkey seed, as `nsc` writes them) or `?nkey=/path/seed.nk` (an nkey seed). Several
    /// servers: `nats://a:4222,b:4222`. An unreachable server is a transient `Publish`
    /// error; a malformed URL, a refused credential or an unreadable file a `Config` error;
    /// neither password, token nor seed is ever printed (nor logged by the client: the `outbox`
    /// command keeps `async_nats` at info).
    pub async fn connect(url: &str) -> outbox_core::Result<Self> {
        let shown = redact_url(url);
        let (servers, options) = connect_options(url).await?;
        let client = options
            .connection_timeout(Duration::from_secs(5))
            .connect(servers.as_str())
            .await
            .map_err(|e| {
                use async_nats::ConnectErrorKind as K;
                let (kind, retry) = match e.kind() {
                    K::ServerParse => (ErrorKind::Config, Retry::Permanent),
                    K::Authentication | K::AuthorizationViolation | K::Tls => {
                        (ErrorKind::Config, Retry::Permanent)
                    }
                    _ => (ErrorKind::Publish, Retry::Transient),
                };
                Error::new(
                    kind,
                    retry,
                    // The error with its cause ("IO error: Connection refused"), not just
                    // the kind ("IO error").
                    format!("cannot connect to NATS at {shown}: {e}"),
                )
            })?;
        Ok(Self::from_client(client))
    }

    /// Use a connected client.
    pub fn from_client(client: async_nats::Client) -> Self {
        let jetstream = async_nats::jetstream::new(client.clone());
        Self { client, jetstream }
    }

    /// The JetStream context (to create streams, say).
    pub fn jetstream(&self) -> &async_nats::jetstream::Context {
        &self.jetstream
    }

    fn message(envelope: &Envelope) -> outbox_core::Result<Publish> {
        check_headers(envelope)?;
        let m = &envelope.message;
        let id = envelope.id.to_string();
        // The message's own headers first, the publisher's after them: none of the user's
        // can stand in for the id, the stream or the key (and `check_headers` refuses the
        // names NATS or the inbox would obey).
        let mut publish = Publish::build().payload(Bytes::copy_from_slice(&m.payload));
        for (name, value) in &m.headers {
            publish = publish.header(name.as_str(), value.as_str());
        }
        publish = publish
            .message_id(&id)
            .header("outbox-id", id.as_str())
            .header("outbox-stream", m.stream.as_str())
            .header("content-type", m.content_type.as_str());
        if let Some(k) = &m.key {
            publish = publish.header("outbox-key", k.as_str());
        }
        Ok(publish)
    }
}

/// Header names NATS gives a meaning to (`Nats-Msg-Id` de-duplicates, `Nats-Rollup` erases
/// history, `Nats-Expected-*` make the publish conditional, ...) and the key the inbox reads:
/// a message may not carry them (compared without case).
fn check_headers(envelope: &Envelope) -> outbox_core::Result<()> {
    for (name, value) in &envelope.message.headers {
        let reserved = name
            .get(..5)
            .is_some_and(|p| p.eq_ignore_ascii_case("nats-"))
            || name.eq_ignore_ascii_case("outbox-key");
        if reserved {
            return Err(Error::new(
                ErrorKind::Publish,
                Retry::Permanent,
                format!(
                    "header {:?} is reserved: NATS (or the outbox) gives it a meaning; not sent",
                    name.chars().take(64).collect::<String>()
                ),
            ));
        }
        if value.contains(['\r', '\n']) {
            return Err(Error::new(
                ErrorKind::Publish,
                Retry::Permanent,
                format!("header {name:?} has a line break, which NATS headers cannot carry"),
            ));
        }
    }
    Ok(())
}

/// The servers (`nats://host:port`, without credentials or query) and the options the URL's
/// credentials make.
async fn connect_options(url: &str) -> outbox_core::Result<(String, async_nats::ConnectOptions)> {
    let bad = |why: &str| Error::config(format!("NATS URL {}: {why}", redact_url(url)));
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| bad("use nats://host:4222"))?;
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (userinfo, hosts) = match rest.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, rest),
    };
    let mut options = async_nats::ConnectOptions::new();
    match userinfo.map(|u| u.split_once(':')) {
        Some(Some((user, password))) => {
            options = options.user_and_password(
                outbox_core::tls::percent_decode(user),
                outbox_core::tls::percent_decode(password),
            );
        }
        Some(None) => {
            options = options.token(outbox_core::tls::percent_decode(userinfo.unwrap_or("")));
        }
        None => {}
    }
    for param in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = param.split_once('=').unwrap_or((param, ""));
        let path = std::path::PathBuf::from(outbox_core::tls::percent_decode(value));
        match name {
            "creds" => {
                options = options.credentials_file(&path).await.map_err(|e| {
                    bad(&format!(
                        "cannot read the credentials file {}",
                        path.display()
                    ))
                    .with_source(e)
                })?;
            }
            "nkey" => {
                let seed = std::fs::read_to_string(&path).map_err(|e| {
                    bad(&format!(
                        "cannot read the nkey seed file {}",
                        path.display()
                    ))
                    .with_source(e)
                })?;
                options = options.nkey(seed.trim().to_owned());
            }
            other => {
                return Err(bad(&format!(
                    "unknown parameter {:?}: use creds or nkey",
                    other.chars().take(32).collect::<String>()
                )))
            }
        }
    }
    let servers = hosts
        .split(',')
        .map(|h| format!("{scheme}://{h}"))
        .collect::<Vec<_>>()
        .join(",");
    Ok((servers, options))
}

fn classify(subject: &str, e: &async_nats::jetstream::context::PublishError) -> Error {
    match e.kind() {
        PublishErrorKind::StreamNotFound => Error::new(
            ErrorKind::Unroutable,
            Retry::Permanent,
            format!("no JetStream stream takes subject {subject:?}"),
        ),
        kind => Error::new(
            ErrorKind::Publish,
            Retry::Transient,
            format!("JetStream publish to {subject:?} failed: {kind}"),
        ),
    }
}

fn check_subject(subject: &str) -> outbox_core::Result<()> {
    let ok = !subject.is_empty()
        && !subject.contains(char::is_whitespace)
        && subject
            .split('.')
            .all(|t| !t.is_empty() && t != "*" && t != ">");
    if ok {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::Unroutable,
            Retry::Permanent,
            format!(
                "destination {:?} is not a NATS subject to publish to (no spaces, empty tokens or wildcards)",
                subject.chars().take(64).collect::<String>()
            ),
        ))
    }
}

#[async_trait]
impl Publisher for NatsPublisher {
    async fn publish(&self, envelope: &Envelope) -> outbox_core::Result<()> {
        let subject = envelope.message.destination.as_str();
        check_subject(subject)?;
        let ack = self
            .jetstream
            .send_publish(subject.to_owned(), Self::message(envelope)?)
            .await
            .map_err(|e| classify(subject, &e))?;
        ack.await.map_err(|e| classify(subject, &e))?;
        Ok(())
    }

    /// Sends every message, then awaits every acknowledgement (one round trip for the batch;
    /// the relay puts at most one message of an ordering unit in a batch).
    async fn publish_batch(&self, batch: &[&Envelope]) -> Vec<outbox_core::Result<()>> {
        let mut pending = Vec::with_capacity(batch.len());
        for envelope in batch {
            let subject = envelope.message.destination.clone();
            let sent = match check_subject(&subject).and_then(|()| Self::message(envelope)) {
                Ok(publish) => self
                    .jetstream
                    .send_publish(subject.clone(), publish)
                    .await
                    .map_err(|e| classify(&subject, &e)),
                Err(e) => Err(e),
            };
            pending.push((subject, sent));
        }
        let mut out = Vec::with_capacity(pending.len());
        for (subject, sent) in pending {
            out.push(match sent {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| classify(&subject, &e)),
                Err(e) => Err(e),
            });
        }
        out
    }

    /// Reserved header names (`Nats-*`, `outbox-key`) and subjects that cannot be published
    /// to are refused before anything is sent.
    fn check_message(&self, envelope: &Envelope) -> outbox_core::Result<()> {
        check_subject(&envelope.message.destination)?;
        check_headers(envelope)
    }

    async fn check(&self) -> outbox_core::Result<()> {
        self.client.flush().await.map_err(|e| {
            Error::new(
                ErrorKind::Publish,
                Retry::Transient,
                format!("NATS does not answer: {e}"),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects() {
        assert!(check_subject("orders.placed").is_ok());
        for bad in ["", "a b", "a..b", "orders.*", "orders.>", ".a"] {
            assert_eq!(
                check_subject(bad).unwrap_err().kind(),
                ErrorKind::Unroutable,
                "{bad:?}"
            );
        }
    }
}
