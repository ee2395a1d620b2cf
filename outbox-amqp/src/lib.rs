//! RabbitMQ publisher for the `outbox` framework (lapin, AMQP 0-9-1).
//!
//! - **Destination**: `exchange/routing-key`, or a bare `queue-name` for the default
//!   exchange (routing key = queue name).
//! - **Durability**: publisher confirms on, persistent delivery (`delivery_mode = 2`); a
//!   publish succeeds only when the broker confirmed it.
//! - **No silent drop**: every publish is `mandatory`, so a message no queue is bound for is
//!   returned by the broker and fails permanently ([`outbox_core::ErrorKind::Unroutable`])
//!   instead of vanishing.
//! - **Metadata**: `message_id` = the outbox id (consumers de-duplicate on it),
//!   `content_type`, `timestamp`, and headers: the message's own plus `x-outbox-stream` and
//!   `x-outbox-key`.
//! - **Batches**: all messages are sent, then all confirms awaited: one round trip per batch.
//! - **Reconnect**: a lost connection or channel is re-established on the next publish; the
//!   failed publishes are transient errors the relay retries.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod source;
pub use source::{AmqpSource, AmqpToken};

use async_trait::async_trait;

/// The lapin version this publisher is built with.
pub use lapin;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::Confirmation;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use outbox_core::{Envelope, Error, ErrorKind, Publisher, Retry};
use tokio::sync::Mutex;

/// Map a lapin error: I/O, connection and channel state errors are transient (a reconnect
/// fixes them); protocol-level refusals such as a missing exchange, and `FRAME_ERROR`, are
/// permanent.
pub fn map_err(e: lapin::Error) -> Error {
    let permanent_refusal = matches!(e.kind(), lapin::ErrorKind::ProtocolError(p) if is_permanent_soft(p) || is_frame_error(p));
    let retry = if e.can_be_recovered() && !permanent_refusal {
        Retry::Transient
    } else {
        Retry::Permanent
    };
    Error::new(ErrorKind::Publish, retry, "amqp").with_source(e)
}

/// The broker closed the connection over a frame it could not take (a header table over
/// `frame_max`, ...): sending the same message again fails the same way.
fn is_frame_error(p: &lapin::protocol::AMQPError) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPHardError};
    matches!(p.kind(), AMQPErrorKind::Hard(AMQPHardError::FRAMEERROR))
}

fn is_permanent_soft(p: &lapin::protocol::AMQPError) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(
        p.kind(),
        AMQPErrorKind::Soft(
            AMQPSoftError::NOTFOUND
                | AMQPSoftError::ACCESSREFUSED
                | AMQPSoftError::PRECONDITIONFAILED
        )
    )
}

use outbox_core::redact_url as redact;
use outbox_core::tls::TlsFiles;

/// Publishes to RabbitMQ with publisher confirms.
pub struct AmqpPublisher {
    url: String,
    tls: lapin::tcp::OwnedTLSConfig,
    state: Mutex<Option<(Connection, Channel)>>,
    /// A batch was abandoned mid-way (the relay's publish deadline dropped it) or timed out:
    /// the connection may be half-open (a partition: no reset, no EOF, so lapin still calls
    /// it connected), and the next batch opens a new one.
    suspect: std::sync::atomic::AtomicBool,
}

/// Marks the connection suspect when dropped armed (mid-batch, or after a timeout).
struct Watch<'a>(&'a std::sync::atomic::AtomicBool, bool);

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        if self.1 {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

impl std::fmt::Debug for AmqpPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpPublisher")
            .field("url", &redact(&self.url))
            .finish_non_exhaustive()
    }
}

/// `exchange/routing-key`, or `queue` for the default exchange.
pub fn parse_destination(destination: &str) -> (&str, &str) {
    match destination.split_once('/') {
        Some((exchange, routing_key)) => (exchange, routing_key),
        None => ("", destination),
    }
}

/// The URL without its TLS file parameters, and the TLS material they name (read and checked).
pub(crate) fn endpoint(url: &str) -> outbox_core::Result<(String, lapin::tcp::OwnedTLSConfig)> {
    let (url, files) = TlsFiles::from_url(url);
    let uri = url
        .parse::<lapin::uri::AMQPUri>()
        .map_err(|_| Error::config(format!("invalid AMQP URL {}", redact(&url))))?;
    let tls_scheme = uri.scheme == lapin::uri::AMQPScheme::AMQPS;
    if !files.is_empty() && !tls_scheme {
        return Err(Error::config(format!(
            "{} are TLS settings: use an amqps:// URL",
            TlsFiles::PARAMS.join(", ")
        )));
    }
    if tls_scheme && !cfg!(feature = "tls") {
        return Err(Error::config(
            "amqps:// needs outbox-amqp's `tls` feature (on by default)",
        ));
    }
    let material = files.load()?;
    let tls = lapin::tcp::OwnedTLSConfig {
        identity: material
            .identity
            .map(|(pem, key)| lapin::tcp::OwnedIdentity::PKCS8 { pem, key }),
        cert_chain: material
            .ca
            .map(|ca| String::from_utf8_lossy(&ca).into_owned()),
    };
    Ok((url, tls))
}

/// Open a connection to `url` with `tls`; any failure is a transient error naming the
/// (redacted) URL.
pub(crate) async fn open_connection(
    url: &str,
    tls: &lapin::tcp::OwnedTLSConfig,
) -> outbox_core::Result<Connection> {
    let wrap = |e: lapin::Error| {
        Error::new(
            ErrorKind::Publish,
            Retry::Transient,
            format!("cannot connect to RabbitMQ at {}", redact(url)),
        )
        .with_source(map_err(e))
    };
    let runtime = lapin::runtime::default_runtime().map_err(wrap)?;
    Connection::connect_with_config(url, ConnectionProperties::default(), tls.clone(), runtime)
        .await
        .map_err(wrap)
}

impl AmqpPublisher {
    /// Connect to `url` (`amqp://user:pass@host:5672/%2f`, or `amqps://…` for TLS) and open a
    /// confirming channel. A malformed URL or TLS file is a `Config` error; an unreachable
    /// broker or a failed TLS handshake a transient `Publish` error.
    ///
    /// TLS (`amqps://`, feature `tls`) verifies the server against the system's roots, or
    /// against the PEM bundle named by `?cacertfile=PATH`; `&certfile=PATH&keyfile=PATH` add a
    /// client certificate (RabbitMQ's URI parameter names). The files are read and checked here.
    pub async fn connect(url: &str) -> outbox_core::Result<Self> {
        let (url, tls) = endpoint(url)?;
        let publisher = Self {
            url,
            tls,
            state: Mutex::new(None),
            suspect: std::sync::atomic::AtomicBool::new(false),
        };
        publisher.channel().await?;
        Ok(publisher)
    }

    async fn open(&self) -> outbox_core::Result<(Connection, Channel)> {
        let wrap = |e: lapin::Error| {
            let retry = map_err(e);
            Error::new(
                ErrorKind::Publish,
                Retry::Transient,
                format!("cannot connect to RabbitMQ at {}", redact(&self.url)),
            )
            .with_source(retry)
        };
        let conn = open_connection(&self.url, &self.tls).await?;
        let channel = conn.create_channel().await.map_err(wrap)?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(wrap)?;
        Ok((conn, channel))
    }

    /// The current channel, reconnecting if the connection or channel was lost.
    async fn channel(&self) -> outbox_core::Result<Channel> {
        let mut state = self.state.lock().await;
        if self
            .suspect
            .swap(false, std::sync::atomic::Ordering::SeqCst)
            && state.take().is_some()
        {
            tracing::warn!("a RabbitMQ batch was abandoned or timed out; opening a new connection");
        }
        if let Some((conn, channel)) = state.as_ref() {
            if conn.status().connected() && channel.status().connected() {
                return Ok(channel.clone());
            }
            tracing::info!("RabbitMQ connection or channel lost; reconnecting");
        }
        let (conn, channel) = self.open().await?;
        *state = Some((conn, channel.clone()));
        Ok(channel)
    }

    fn properties(envelope: &Envelope) -> BasicProperties {
        let m = &envelope.message;
        let mut headers = FieldTable::default();
        for (name, value) in &m.headers {
            headers.insert(
                name.as_str().into(),
                AMQPValue::LongString(value.as_str().into()),
            );
        }
        headers.insert(
            "x-outbox-stream".into(),
            AMQPValue::LongString(m.stream.as_str().into()),
        );
        if let Some(key) = &m.key {
            headers.insert(
                "x-outbox-key".into(),
                AMQPValue::LongString(key.as_str().into()),
            );
        }
        let timestamp = envelope
            .created_at
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        BasicProperties::default()
            .with_message_id(envelope.id.to_string().into())
            .with_content_type(m.content_type.as_str().into())
            .with_delivery_mode(2)
            .with_timestamp(timestamp)
            .with_headers(headers)
    }
}

/// Largest header table sent: RabbitMQ's default frame_max is 128 KiB, and a content header
/// over it closes the connection (on every retry).
pub const MAX_HEADER_TABLE_BYTES: usize = 64 * 1024;

/// What RabbitMQ would refuse by closing the channel or the connection, which fails every
/// other message in flight: `CC` / `BCC` headers (sender-selected distribution, which RabbitMQ
/// interprets), and a header table too large for a frame. Permanent errors of this message.
fn check(env: &Envelope) -> outbox_core::Result<()> {
    let headers = &env.message.headers;
    if let Some(name) = headers
        .keys()
        .find(|k| k.eq_ignore_ascii_case("cc") || k.eq_ignore_ascii_case("bcc"))
    {
        return Err(Error::new(
            ErrorKind::Publish,
            Retry::Permanent,
            format!("header {name:?} is interpreted by RabbitMQ (sender-selected distribution): not sent"),
        ));
    }
    let size: usize = headers.iter().map(|(k, v)| k.len() + v.len() + 6).sum();
    if size > MAX_HEADER_TABLE_BYTES {
        return Err(Error::new(
            ErrorKind::Publish,
            Retry::Permanent,
            format!("headers take {size} bytes: over the {MAX_HEADER_TABLE_BYTES} bytes an AMQP frame holds"),
        ));
    }
    Ok(())
}

fn confirmation(c: Result<Confirmation, lapin::Error>) -> outbox_core::Result<()> {
    match c {
        Ok(Confirmation::Ack(None)) => Ok(()),
        Ok(Confirmation::Ack(Some(returned))) => Err(Error::new(
            ErrorKind::Unroutable,
            Retry::Permanent,
            format!(
                "RabbitMQ returned the message: {} {} (exchange {:?}, routing key {:?})",
                returned.reply_code,
                returned.reply_text.as_str(),
                returned.delivery.exchange.as_str(),
                returned.delivery.routing_key.as_str()
            ),
        )),
        Ok(Confirmation::Nack(_)) => Err(Error::transient("RabbitMQ nacked the message")),
        Ok(Confirmation::NotRequested) => Err(Error::transient(
            "publisher confirms are not enabled on the channel",
        )),
        Err(e) => Err(map_err(e)),
    }
}

#[async_trait]
impl Publisher for AmqpPublisher {
    async fn publish(&self, envelope: &Envelope) -> outbox_core::Result<()> {
        outbox_core::single_result(self.publish_batch(&[envelope]).await)
    }

    /// An open connection and channel (reconnecting if they were lost).
    async fn check(&self) -> outbox_core::Result<()> {
        self.channel().await.map(drop)
    }

    /// A batch goes out on one channel with confirms, in order; messages sent again after a
    /// channel closed are sent again in batch order, and once one of them fails again, no
    /// later one to the same destination is sent again.
    fn ordered_batches(&self) -> bool {
        true
    }

    /// `CC` / `BCC` headers and header tables over a frame are refused before sending.
    fn check_message(&self, envelope: &Envelope) -> outbox_core::Result<()> {
        check(envelope)
    }

    async fn publish_batch(&self, batch: &[&Envelope]) -> Vec<outbox_core::Result<()>> {
        let mut watch = Watch(&self.suspect, true);
        let mut results = self.send(batch).await;
        // When the broker closes the channel over one message (a missing exchange, ...),
        // lapin reports that message's error to every confirm pending on the channel, sent
        // before it or after: the errors say nothing about the other messages. Send each
        // failed message again on its own (a fresh channel when needed), so each gets its own
        // outcome and only the culprit fails. (A duplicate is possible for a message the
        // broker had taken before the close; consumers de-duplicate on message_id.)
        let closed = results.iter().any(|r| {
            r.as_ref()
                .is_err_and(|e| !e.is_transient() && e.kind() != ErrorKind::Unroutable)
        });
        if closed {
            let mut refused: Vec<&str> = Vec::new();
            for i in 0..batch.len() {
                let destination = batch[i].message.destination.as_str();
                if refused.contains(&destination) {
                    // A later message must not overtake an earlier one that failed: it is not
                    // sent again, and fails with its own refusal or a transient error.
                    if results[i].is_err() {
                        results[i] = check(batch[i]).and(Err(Error::transient(
                            "not sent again: an earlier message to its destination failed in this batch",
                        )));
                    }
                    continue;
                }
                if results[i]
                    .as_ref()
                    .is_err_and(|e| e.kind() != ErrorKind::Unroutable)
                {
                    results[i] = self
                        .send(&[batch[i]])
                        .await
                        .pop()
                        .unwrap_or_else(|| Err(Error::transient("no result")));
                }
                if results[i].is_err() {
                    refused.push(destination);
                }
            }
        }
        watch.1 = results
            .iter()
            .any(|r| r.as_ref().is_err_and(|e| e.kind() == ErrorKind::Timeout));
        drop(watch);
        results
    }
}

impl AmqpPublisher {
    /// Send `batch` on the current channel (reopened if lost), then await every confirm.
    async fn send(&self, batch: &[&Envelope]) -> Vec<outbox_core::Result<()>> {
        let channel = match self.channel().await {
            Ok(c) => c,
            Err(e) => {
                let msg = e.to_string();
                return batch
                    .iter()
                    .map(|_| Err(Error::transient(msg.clone())))
                    .collect();
            }
        };
        // Send everything, then await every confirm. A message RabbitMQ would answer by
        // closing the channel fails alone, before anything is sent.
        let mut pending = Vec::with_capacity(batch.len());
        for env in batch {
            if let Err(e) = check(env) {
                pending.push(Err(e));
                continue;
            }
            let (exchange, routing_key) = parse_destination(&env.message.destination);
            let sent = channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &env.message.payload,
                    Self::properties(env),
                )
                .await;
            pending.push(Ok(sent));
        }
        let mut results = Vec::with_capacity(batch.len());
        for sent in pending {
            results.push(match sent {
                Err(refused) => Err(refused),
                Ok(Ok(confirm)) => confirmation(confirm.await),
                Ok(Err(e)) => Err(map_err(e)),
            });
        }
        results
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_errors_are_permanent_connection_losses_transient() {
        use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPHardError};
        let protocol = |hard: AMQPHardError| {
            lapin::Error::from(lapin::ErrorKind::ProtocolError(AMQPError::new(
                AMQPErrorKind::Hard(hard),
                "closed".into(),
            )))
        };
        assert!(!map_err(protocol(AMQPHardError::FRAMEERROR)).is_transient());
        assert!(map_err(protocol(AMQPHardError::CONNECTIONFORCED)).is_transient());
    }

    #[test]
    fn destinations() {
        assert_eq!(parse_destination("orders"), ("", "orders"));
        assert_eq!(
            parse_destination("events/orders.placed"),
            ("events", "orders.placed")
        );
        assert_eq!(parse_destination("events/a/b"), ("events", "a/b"));
        assert_eq!(
            redact("amqp://guest:secret@h:5672/%2f"),
            "amqp://guest:***@h:5672/%2f"
        );
    }
}
