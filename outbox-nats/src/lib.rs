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
    /// Connect to `nats://host:4222` (credentials in the URL as `nats://user:pass@host`).
    /// An unreachable server is a transient `Publish` error, a malformed URL a `Config`
    /// error; the URL's password is never printed.
    pub async fn connect(url: &str) -> outbox_core::Result<Self> {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .connect(url)
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
                    format!(
                        "cannot connect to NATS at {}: {}",
                        redact_url(url),
                        e.kind()
                    ),
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
