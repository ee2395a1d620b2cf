//! What a broker delivers: a message with its outbox id, one that cannot be read, and the
//! [`Source`] that receives and acknowledges them.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::message::MessageId;
use crate::trace::valid_traceparent;

/// The header every publisher of this project sets to the message id (Kafka and NATS
/// headers; RabbitMQ also sets `message_id`, Redis Streams the `id` field).
pub const ID_HEADER: &str = "outbox-id";

/// A message as a broker delivered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The outbox message id: what the inbox de-duplicates on.
    pub id: MessageId,
    /// Where it came from: the topic, queue, stream key or subject.
    pub source: String,
    /// The outbox stream it was written to, when the publisher carried it.
    pub stream: Option<String>,
    /// The message key, when it had one.
    pub key: Option<String>,
    /// Its content type, when carried.
    pub content_type: Option<String>,
    /// Application headers (the publishers' own `outbox-*` headers are left out).
    pub headers: BTreeMap<String, String>,
    /// The payload.
    pub payload: Vec<u8>,
}

impl Received {
    /// A message with `id` from `source`, no metadata.
    pub fn new(id: MessageId, source: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        Self {
            id,
            source: source.into(),
            stream: None,
            key: None,
            content_type: None,
            headers: BTreeMap::new(),
            payload: payload.into(),
        }
    }

    /// The payload as JSON; a payload that does not decode is a permanent `InvalidMessage`
    /// error (the message goes to the dead letters at once: retrying cannot fix it).
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.payload).map_err(|e| {
            Error::invalid_message(format!(
                "message {}: payload is not the JSON expected: {e}",
                self.id
            ))
        })
    }

    /// A message read back from an inbox's dead-letter table (for stores): the id as text,
    /// the headers as a JSON map. Rows are input: a bad id or headers is a `Store` error
    /// naming the row.
    pub fn from_stored(
        id: &str,
        source: Option<String>,
        stream: Option<String>,
        key: Option<String>,
        content_type: Option<String>,
        headers: Option<String>,
        payload: Option<Vec<u8>>,
    ) -> Result<Self> {
        let id: MessageId = id.parse().map_err(|_| {
            Error::store(format!("inbox row with an id that is not a UUID: {id:?}"))
        })?;
        let headers: BTreeMap<String, String> = match headers {
            Some(h) => serde_json::from_str(&h)
                .map_err(|_| Error::store(format!("inbox row {id}: headers are not a JSON map")))?,
            None => BTreeMap::new(),
        };
        Ok(Self {
            id,
            source: source.unwrap_or_default(),
            stream,
            key,
            content_type,
            headers,
            payload: payload.unwrap_or_default(),
        })
    }

    /// The payload as UTF-8 text (a permanent `InvalidMessage` error otherwise).
    pub fn text(&self) -> Result<&str> {
        std::str::from_utf8(&self.payload).map_err(|_| {
            Error::invalid_message(format!("message {}: payload is not UTF-8", self.id))
        })
    }
}

/// A delivery's size as [`Consumer::max_delivery_bytes`] counts it: payload and headers.
pub(super) fn delivery_size(m: &Received) -> usize {
    m.payload.len()
        + m.headers
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
}

/// Parse a message id read from a delivery's metadata (`what` names where, for the error).
pub fn parse_id(value: Option<&[u8]>, what: &str) -> std::result::Result<MessageId, String> {
    let value = value.ok_or_else(|| format!("no {what}: not a message of an outbox"))?;
    let text = std::str::from_utf8(value).map_err(|_| format!("{what} is not UTF-8"))?;
    text.parse::<MessageId>().map_err(|_| {
        format!(
            "{what} is not a message id: {:?}",
            crate::printable(&text[..text.len().min(60)])
        )
    })
}

/// A delivery whose `traceparent` is malformed becomes unreadable: bad input, kept as a
/// dead letter, never processed.
pub(super) fn refuse_bad_trace_context<T>(deliveries: Vec<Incoming<T>>) -> Vec<Incoming<T>> {
    deliveries
        .into_iter()
        .map(|d| match d.message {
            Ok(m)
                if m.headers
                    .get("traceparent")
                    .is_some_and(|t| !valid_traceparent(t)) =>
            {
                Incoming {
                    message: Err(Unreadable {
                        source: format!("{}#{}", m.source, m.id),
                        reason: format!("message {}: malformed traceparent header", m.id),
                        headers: m.headers,
                        payload: m.payload,
                    }),
                    token: d.token,
                }
            }
            message => Incoming {
                message,
                token: d.token,
            },
        })
        .collect()
}

/// A delivery that could not be read as an outbox message (no id header, say). It is kept
/// as a dead letter and acknowledged: not processed, not lost. Its dead letter's id is
/// derived from where it sits in the broker (or, where the broker has no stable position,
/// from its content), so the same delivery redelivered is one dead letter, not two.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    /// Where it came from, with its position when the broker has one
    /// (`topic/partition@offset`, a stream entry id, a stream sequence).
    pub source: String,
    /// Why it could not be read (one line, no payload).
    pub reason: String,
    /// Its headers, as far as they are text.
    pub headers: BTreeMap<String, String>,
    /// Its payload.
    pub payload: Vec<u8>,
}

impl Unreadable {
    /// The id its dead letter is kept under: a name-based UUID (version 8, SHA-256) of its
    /// source and, for sources without a position, its headers and payload.
    pub fn stable_id(&self) -> MessageId {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(b"outbox unreadable delivery\0");
        h.update(self.source.as_bytes());
        h.update(b"\0");
        for (k, v) in &self.headers {
            h.update(k.as_bytes());
            h.update(b"\0");
            h.update(v.as_bytes());
            h.update(b"\0");
        }
        h.update(&self.payload);
        let digest = h.finalize();
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        MessageId(uuid::Builder::from_custom_bytes(bytes).into_uuid())
    }
}

/// One delivery from a [`Source`] and the token that acknowledges it.
#[derive(Debug)]
pub struct Incoming<T> {
    /// The message, or why it is not one.
    pub message: std::result::Result<Received, Unreadable>,
    /// What [`Source::ack`] takes back.
    pub token: T,
}

/// A broker consumer: receives deliveries and acknowledges them once their effects are
/// committed. Implemented by `outbox-kafka`, `outbox-amqp`, `outbox-redis` and `outbox-nats`.
#[async_trait]
pub trait Source: Send {
    /// What acknowledges one delivery (cloned when an acknowledgement must be tried again).
    type Token: Send + Clone;

    /// Up to `max` deliveries, waiting up to `wait` for the first (an empty batch then).
    /// A broker error is returned (the consumer backs off and calls again).
    async fn receive(&mut self, max: usize, wait: Duration) -> Result<Vec<Incoming<Self::Token>>>;

    /// Acknowledge deliveries, in the order received, after their effects committed.
    async fn ack(&mut self, tokens: Vec<Self::Token>) -> Result<()>;
}
