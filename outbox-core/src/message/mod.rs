//! What the application enqueues ([`Message`]) and what the store keeps ([`StoredMessage`]).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use serde::Serialize;

use crate::error::{Error, ErrorKind, Result, Retry};
mod answers;
pub use answers::{Exhausted, Order, Schedule};

/// The stream a message belongs to when none is set.
pub const DEFAULT_STREAM: &str = "default";

/// A message to publish, as the application builds it.
///
/// ```
/// use outbox_core::Message;
/// #[derive(serde::Serialize)]
/// struct OrderPlaced { id: u64 }
/// let m = Message::json("orders.placed", &OrderPlaced { id: 7 })?
///     .stream("orders")
///     .key("customer-42")
///     .header("schema", "v1");
/// assert_eq!(m.payload, br#"{"id":7}"#);
/// # Ok::<(), outbox_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Logical channel; relays can be limited to streams and strategies are set per stream.
    pub stream: String,
    /// Where the publisher sends it: a topic, `exchange/routing-key`, a Redis stream key, a
    /// function name, a URL path.
    pub destination: String,
    /// Ordering and partition key. With keep-order, messages of one (stream, key) are
    /// published in commit order.
    pub key: Option<String>,
    /// The encoded body.
    pub payload: Vec<u8>,
    /// MIME type of `payload`.
    pub content_type: String,
    /// Application headers, carried to the broker.
    pub headers: BTreeMap<String, String>,
    /// When it may be published first ([`deliver_at`](Self::deliver_at),
    /// [`delay`](Self::delay)); applied at enqueue (stored as the row's first attempt time),
    /// so always `None` on messages read back from a store.
    pub schedule: Option<Schedule>,
}

impl Message {
    /// A message with raw bytes.
    pub fn new(destination: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        Self {
            stream: DEFAULT_STREAM.to_owned(),
            destination: destination.into(),
            key: None,
            payload: payload.into(),
            content_type: "application/octet-stream".to_owned(),
            headers: BTreeMap::new(),
            schedule: None,
        }
    }

    /// A message whose payload is `value` encoded as JSON with serde_json.
    pub fn json<T: Serialize + ?Sized>(destination: impl Into<String>, value: &T) -> Result<Self> {
        Self::encoded(destination, value, &JsonEncoder)
    }

    /// A message whose payload is `value` encoded by `encoder`.
    pub fn encoded<T: Serialize + ?Sized>(
        destination: impl Into<String>,
        value: &T,
        encoder: &dyn Encoder,
    ) -> Result<Self> {
        let payload = encoder.encode(&value)?;
        Ok(Self::new(destination, payload).content_type(encoder.content_type()))
    }

    /// Set the stream.
    pub fn stream(mut self, stream: impl Into<String>) -> Self {
        self.stream = stream.into();
        self
    }

    /// Set the ordering / partition key.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Set the content type.
    pub fn content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = content_type.into();
        self
    }

    /// Publish no earlier than `time`, by the database's clock. The relay publishes it (also
    /// on a publish-on-commit stream); in a keep-order unit it holds back the messages behind
    /// it. At most [`Config::max_delay`](crate::Config::max_delay) ahead.
    pub fn deliver_at(mut self, time: SystemTime) -> Self {
        self.schedule = Some(Schedule::At(time));
        self
    }

    /// Publish no earlier than `delay` after the enqueue, by the database's clock (see
    /// [`deliver_at`](Self::deliver_at)).
    pub fn delay(mut self, delay: std::time::Duration) -> Self {
        self.schedule = Some(Schedule::After(delay));
        self
    }

    /// Add a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// The size the payload limit applies to: the payload's bytes plus each header's name and
    /// value bytes. The one definition of a message's size: enqueue, the on-commit path and
    /// the relay's re-check of a claimed row all measure this, whatever form a store keeps
    /// the headers in (JSON text, `jsonb`), so a message accepted at enqueue is never
    /// quarantined for its size by the relay under the same limit.
    pub fn size(&self) -> usize {
        self.payload.len()
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }

    /// Check the message against the limits; nothing is written when this fails. The relay
    /// checks every claimed row again with the same rules. Limits: names 1-255 bytes without
    /// control characters or surrounding whitespace, destination up to 512 bytes, at most
    /// [`MAX_HEADERS`] headers with values up to [`MAX_HEADER_VALUE`] bytes and no
    /// [`RESERVED_HEADERS`], and payload plus headers within `max_payload` bytes.
    pub fn validate(&self, max_payload: usize) -> Result<()> {
        let bad = |m: String| Err(Error::invalid_message(m));
        if self.destination.trim().is_empty() {
            return bad("destination is empty".into());
        }
        if self.destination.len() > 512 || self.destination.chars().any(char::is_control) {
            return bad(format!(
                "destination {:?} is over 512 bytes or has control characters",
                truncate(&self.destination)
            ));
        }
        if self.stream.is_empty()
            || self.stream.len() > 255
            || self.stream.chars().any(char::is_control)
        {
            return bad(format!(
                "stream {:?} must be 1-255 bytes without control characters",
                truncate(&self.stream)
            ));
        }
        if self.content_type.is_empty()
            || self.content_type.len() > 255
            || self.content_type.chars().any(char::is_control)
        {
            return bad("content type must be 1-255 bytes without control characters".into());
        }
        if self.stream.trim() != self.stream {
            return bad(format!(
                "stream {:?} starts or ends with whitespace (names are compared byte for byte: \"a \" would be another stream than \"a\")",
                truncate(&self.stream)
            ));
        }
        if let Some(key) = &self.key {
            // A line break in a key reached text protocols (NATS subjects and headers) as
            // framing; keys carry no control characters, as streams do not.
            if key.len() > 255 || key.chars().any(char::is_control) {
                return bad("key must be at most 255 bytes without control characters".into());
            }
            if key.trim() != key {
                return bad(format!(
                    "key {:?} starts or ends with whitespace (names are compared byte for byte)",
                    truncate(key)
                ));
            }
        }
        if self.headers.len() > MAX_HEADERS {
            return bad(format!(
                "{} headers: at most {MAX_HEADERS} are allowed",
                self.headers.len()
            ));
        }
        if self.size() > max_payload {
            return bad(format!(
                "payload ({} bytes) and headers ({} bytes) are over the limit of {max_payload} bytes",
                self.payload.len(),
                self.size() - self.payload.len()
            ));
        }
        for (name, value) in &self.headers {
            if RESERVED_HEADERS
                .iter()
                .any(|r| r.eq_ignore_ascii_case(name))
            {
                return bad(format!(
                    "header {name:?} is reserved: the publishers set it themselves"
                ));
            }
            if value.len() > MAX_HEADER_VALUE {
                return bad(format!(
                    "header {name:?} has a value of {} bytes: at most {MAX_HEADER_VALUE}",
                    value.len()
                ));
            }
            let name_ok = !name.is_empty()
                && name.len() <= 255
                && name.chars().all(|c| c.is_ascii_graphic() && c != ':');
            if !name_ok {
                return bad(format!(
                    "header name {:?} must be 1-255 visible ASCII characters without ':'",
                    truncate(name)
                ));
            }
            if value.chars().any(|c| c.is_control() && c != '\t') {
                return bad(format!(
                    "header {name:?} has control characters in its value"
                ));
            }
        }
        Ok(())
    }
}

/// Most headers a message may carry.
pub const MAX_HEADERS: usize = 64;
/// Longest header value, in bytes.
pub const MAX_HEADER_VALUE: usize = 8 * 1024;
/// Header names the publishers set themselves (compared without case): a message cannot
/// override the id consumers de-duplicate on, its stream, its key or its content type.
pub const RESERVED_HEADERS: &[&str] = &[
    "outbox-id",
    "outbox-stream",
    "x-outbox-stream",
    "x-outbox-key",
    "outbox-key",
    "content-type",
];

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// A stable, unique message id (UUIDv7: time-ordered). Sent to brokers so consumers can
/// de-duplicate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(pub uuid::Uuid);

impl MessageId {
    /// A fresh id.
    pub fn new() -> Self {
        Self(uuid::Uuid::now_v7())
    }
}

impl Default for MessageId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for MessageId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        uuid::Uuid::parse_str(s).map(Self).map_err(|e| {
            Error::new(
                ErrorKind::Store,
                Retry::Permanent,
                format!("bad message id {s:?}"),
            )
            .with_source(e)
        })
    }
}

/// Where a stored message is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Waiting to be published (possibly leased by a relay, possibly backing off).
    Pending,
    /// Published; kept until the cleaner removes it (when not deleted after send).
    Sent,
    /// Gave up: kept, visible and requeueable.
    Dead,
}

impl Status {
    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Sent => "sent",
            Status::Dead => "dead",
        }
    }
}

impl FromStr for Status {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "pending" => Ok(Status::Pending),
            "sent" => Ok(Status::Sent),
            "dead" => Ok(Status::Dead),
            other => Err(Error::new(
                ErrorKind::Store,
                Retry::Permanent,
                format!("unknown status {other:?}"),
            )),
        }
    }
}

/// A message with its stable id: what a [`Publisher`](crate::Publisher) receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Stable id sent to the broker (consumers de-duplicate on it).
    pub id: MessageId,
    /// When it was enqueued.
    pub created_at: SystemTime,
    /// The message itself.
    pub message: Message,
}

/// A message as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Store-assigned sequence number: increases in commit order within an ordering unit.
    pub seq: i64,
    /// Id, creation time and message.
    pub envelope: Envelope,
    /// How it is claimed (its strategy's unit answer).
    pub order: Order,
    /// Its ordering unit within the stream (empty: the stream's unit, or unordered).
    pub unit: String,
    /// What exhaustion does (its strategy's answer).
    pub exhausted: Exhausted,
    /// Status.
    pub status: Status,
    /// Publish attempts so far.
    pub attempts: u32,
    /// Earliest time of the next attempt.
    pub next_attempt_at: SystemTime,
    /// The last publish error.
    pub last_error: Option<String>,
    /// When it was published.
    pub sent_at: Option<SystemTime>,
    /// `key-id:hex(hmac-sha256)` when signing is on.
    pub signature: Option<String>,
    /// In a claim: how many times in a row this row (a keep-order row: its unit) has been
    /// claimed without an outcome being recorded, this claim included. A relay that
    /// crashes, is killed or loses its database while publishing it leaves it claimed; a
    /// message that crashes every relay that takes it is failed by the relay once this passes
    /// its retry budget, instead of taking the whole fleet down in turn. 0 for stores that do
    /// not count; outside claims (listings) it means nothing.
    pub claims: u32,
}

impl StoredMessage {
    /// Stands for a row that does not decode, in listings ([`StoreAdmin::get`](crate::StoreAdmin::get),
    /// [`StoreAdmin::dead_letters`](crate::StoreAdmin::dead_letters)): nil id, stream `<unreadable>`,
    /// empty payload, and the row's `status` and `last_error` when those could be read
    /// (`why` is appended to the error).
    pub fn unreadable(
        seq: i64,
        status: Option<Status>,
        last_error: Option<String>,
        why: &str,
    ) -> Self {
        let error = match last_error {
            Some(e) if !e.is_empty() => format!("{e} (unreadable row: {why})"),
            _ => format!("unreadable row: {why}"),
        };
        Self {
            seq,
            envelope: Envelope {
                id: MessageId(uuid::Uuid::nil()),
                created_at: SystemTime::UNIX_EPOCH,
                message: Message::new("", Vec::new()).stream("<unreadable>"),
            },
            order: Order::InUnit,
            unit: String::new(),
            exhausted: Exhausted::Default,
            status: status.unwrap_or(Status::Dead),
            attempts: 0,
            next_attempt_at: SystemTime::UNIX_EPOCH,
            last_error: Some(error),
            sent_at: None,
            signature: None,
            claims: 0,
        }
    }

    /// The ordering unit: (stream, unit).
    pub fn ordering_unit(&self) -> (&str, &str) {
        (&self.envelope.message.stream, &self.unit)
    }
}

/// Encodes payloads; the default is [`JsonEncoder`] (jaiminho's `DEFAULT_ENCODER`).
pub trait Encoder: Send + Sync + 'static {
    /// MIME type of what `encode` produces.
    fn content_type(&self) -> &str;
    /// Encode a value.
    fn encode(&self, value: &dyn erased_serde::Serialize) -> Result<Vec<u8>>;
}

/// serde_json encoder, `application/json`.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonEncoder;

impl Encoder for JsonEncoder {
    fn content_type(&self) -> &str {
        "application/json"
    }
    fn encode(&self, value: &dyn erased_serde::Serialize) -> Result<Vec<u8>> {
        Ok(serde_json::to_vec(value)?)
    }
}

/// Milliseconds since the Unix epoch (what stores persist).
pub fn to_millis(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    }
}

/// The inverse of [`to_millis`].
pub fn from_millis(ms: i64) -> SystemTime {
    if ms >= 0 {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms as u64)
    } else {
        SystemTime::UNIX_EPOCH - std::time::Duration::from_millis(ms.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn keys_refuse_control_characters() {
        for key in [
            "a\nb",
            "a\rb",
            "a\0b",
            "tab\there",
            "esc\u{1b}[31m",
            "del\u{7f}",
        ] {
            let e = Message::new("d", b"x".to_vec())
                .key(key)
                .validate(1024)
                .unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::InvalidMessage, "{key:?}");
            assert!(e.to_string().contains("control characters"), "{e}");
        }
        Message::new("d", b"x".to_vec())
            .key("customer 7/é")
            .validate(1024)
            .unwrap();
    }

    #[test]
    fn header_limits() {
        let big = 1 << 20;
        let ok = Message::new("d", b"x".to_vec()).header("h", "v".repeat(MAX_HEADER_VALUE));
        assert!(ok.validate(big).is_ok());
        let long = Message::new("d", b"x".to_vec()).header("h", "v".repeat(MAX_HEADER_VALUE + 1));
        assert!(long
            .validate(big)
            .unwrap_err()
            .to_string()
            .contains("at most"));
        let many = (0..=MAX_HEADERS).fold(Message::new("d", Vec::new()), |m, i| {
            m.header(format!("h{i}"), "v")
        });
        assert!(many.validate(big).is_err());
        for name in RESERVED_HEADERS {
            let m = Message::new("d", Vec::new()).header(name.to_uppercase(), "v");
            assert!(m
                .validate(big)
                .unwrap_err()
                .to_string()
                .contains("reserved"));
        }
        // Headers count toward the size limit.
        let m = Message::new("d", vec![0; 10]).header("abc", "defgh");
        assert!(m.validate(18).is_ok());
        assert!(m.validate(17).is_err());
    }

    use super::*;

    #[test]
    fn validation_rejects_bad_input() {
        let ok = Message::new("t", vec![0; 10]);
        assert!(ok.validate(10).is_ok());
        let cases = [
            Message::new("t", vec![0; 11]),
            Message::new("  ", vec![]),
            Message::new("a\nb", vec![]),
            Message::new("t", vec![]).stream(""),
            Message::new("t", vec![]).header("", "x"),
            Message::new("t", vec![]).header("a:b", "x"),
            Message::new("t", vec![]).header("a", "x\r\ny"),
            Message::new("t", vec![]).key("a\0"),
        ];
        for m in cases {
            let e = m.validate(10).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidMessage, "{m:?}");
            assert!(!e.is_transient());
        }
    }

    #[test]
    fn millis_round_trip() {
        let now = SystemTime::now();
        let back = from_millis(to_millis(now));
        assert!(now.duration_since(back).unwrap() < std::time::Duration::from_millis(1));
    }
}
