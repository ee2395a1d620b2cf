//! The consumer side of the pattern: an **inbox** turns at-least-once delivery into
//! exactly-once *effects*.
//!
//! A relay may publish a message more than once (a crash after the broker took it, a lost
//! acknowledgement), and a broker may deliver it more than once (a consumer killed before its
//! acknowledgement, a rebalance). The inbox records, in the consumer's own database
//! transaction, that (consumer, message id) was processed, and the handler's writes commit in
//! that same transaction: both or neither. A message delivered again is recognised and
//! acknowledged without a second effect.
//!
//! - [`Received`]: a message as a broker delivered it, with the outbox id read from its
//!   headers (each publisher sets one: [`ID_HEADER`] and the broker's own id field).
//! - [`Inbox`]: what a store does for one consumer (implemented by `outbox-sqlite` and
//!   `outbox-sql` around a handler that gets the store's own transaction).
//! - [`Source`]: a broker consumer (Kafka, RabbitMQ, Redis Streams, NATS JetStream crates).
//! - [`Consumer`]: the loop: receive, count the attempt, open a transaction, mark, handle,
//!   commit, then acknowledge. Handler failures are retried with the relay's
//!   [`RetryPolicy`]; a message that fails, or crashes the consumer, `max_attempts` times is
//!   kept as a dead letter in the inbox table and acknowledged, so it never blocks its
//!   partition or queue longer than its retries.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::message::MessageId;
use crate::retry::RetryPolicy;
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
fn delivery_size(m: &Received) -> usize {
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
fn refuse_bad_trace_context<T>(deliveries: Vec<Incoming<T>>) -> Vec<Incoming<T>> {
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

/// What the inbox knew of a message when an attempt at it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Not processed yet; this is its `attempts`-th attempt (counted before it runs, so a
    /// consumer that crashes in the handler is counted too).
    New {
        /// Attempts started, this one included.
        attempts: u32,
    },
    /// Already processed: acknowledge it, no second effect.
    Done,
    /// Already a dead letter: acknowledge it.
    Dead,
}

/// The result of [`Inbox::process`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Processed {
    /// The handler ran and its writes committed with the inbox mark.
    Done,
    /// Another delivery of the same id committed first (two consumers at once): nothing ran.
    Duplicate,
}

/// One consumer's inbox in a store: the inbox table and the handler that runs in the same
/// transaction as its mark.
#[async_trait]
pub trait Inbox: Send + Sync {
    /// The consumer name (messages are de-duplicated per consumer).
    fn consumer(&self) -> &str;

    /// In one committed transaction, count an attempt at each message that is neither done nor
    /// dead (its row is created on the first), and say what each is, in order.
    async fn start(&self, ids: &[MessageId]) -> Result<Vec<Seen>>;

    /// In one transaction: mark the message done unless another delivery already did, run
    /// the handler's writes, commit. The handler's error rolls everything back and is
    /// returned as it is.
    async fn process(&self, message: &Received) -> Result<Processed>;

    /// Record the error of a failed attempt (for operators); returns the attempts so far.
    async fn failed(&self, id: MessageId, error: &str) -> Result<u32>;

    /// Keep the message as a dead letter (its content, its last error), not processed.
    async fn dead_letter(&self, message: &Received, error: &str) -> Result<()>;

    /// Dead letters an operator requeued, to process again (at most `limit`); each is
    /// taken back to "started" with its attempts reset.
    async fn requeued(&self, limit: usize) -> Result<Vec<Received>>;
}

macro_rules! forward_inbox {
    ($ty:ty) => {
        #[async_trait]
        impl<I: Inbox + ?Sized> Inbox for $ty {
            fn consumer(&self) -> &str {
                (**self).consumer()
            }
            async fn start(&self, ids: &[MessageId]) -> Result<Vec<Seen>> {
                (**self).start(ids).await
            }
            async fn process(&self, message: &Received) -> Result<Processed> {
                (**self).process(message).await
            }
            async fn failed(&self, id: MessageId, error: &str) -> Result<u32> {
                (**self).failed(id, error).await
            }
            async fn dead_letter(&self, message: &Received, error: &str) -> Result<()> {
                (**self).dead_letter(message, error).await
            }
            async fn requeued(&self, limit: usize) -> Result<Vec<Received>> {
                (**self).requeued(limit).await
            }
        }
    };
}

forward_inbox!(Box<I>);
forward_inbox!(Arc<I>);

/// A dead letter in an inbox, as operators list it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxDeadLetter {
    /// The consumer.
    pub consumer: String,
    /// The message (for an unreadable delivery: a fresh id, and `reason` says so).
    pub message: Received,
    /// Attempts made.
    pub attempts: u32,
    /// The last error.
    pub error: Option<String>,
    /// When it was first seen (the database's clock).
    pub first_seen_at: std::time::SystemTime,
}

/// An inbox table as operators and the [`Cleaner`](crate::Cleaner) use it, whatever the
/// store: implemented by `outbox_sqlite::InboxTable` and `outbox_sql::inbox::SqlInboxTable`.
#[async_trait]
pub trait InboxAdmin: Send + Sync {
    /// The table name.
    fn table(&self) -> &str;

    /// Create the table and its indexes (idempotent).
    async fn migrate(&self) -> Result<()>;

    /// Dead letters, oldest first (of one consumer, or all), at most `limit`.
    async fn dead_letters(
        &self,
        consumer: Option<&str>,
        limit: usize,
    ) -> Result<Vec<InboxDeadLetter>>;

    /// Put a dead letter back for its consumer, which processes it again (attempts from
    /// zero) on its next round. `NotFound` when it is not a dead letter.
    async fn requeue(&self, consumer: &str, id: MessageId) -> Result<()>;

    /// Delete the marks of messages processed more than `older_than` ago, at most `limit`;
    /// returns how many. A message delivered again after its mark is gone is processed
    /// again: keep marks longer than the broker can redeliver.
    async fn clean(&self, older_than: Duration, limit: usize) -> Result<u64>;
}

#[async_trait]
impl<T: InboxAdmin + ?Sized> InboxAdmin for Arc<T> {
    fn table(&self) -> &str {
        (**self).table()
    }
    async fn migrate(&self) -> Result<()> {
        (**self).migrate().await
    }
    async fn dead_letters(
        &self,
        consumer: Option<&str>,
        limit: usize,
    ) -> Result<Vec<InboxDeadLetter>> {
        (**self).dead_letters(consumer, limit).await
    }
    async fn requeue(&self, consumer: &str, id: MessageId) -> Result<()> {
        (**self).requeue(consumer, id).await
    }
    async fn clean(&self, older_than: Duration, limit: usize) -> Result<u64> {
        (**self).clean(older_than, limit).await
    }
}

/// Counts of one [`Consumer::run_once`] or of a whole run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConsumerReport {
    /// Messages whose handler ran and committed.
    pub processed: u64,
    /// Deliveries of messages already processed (or processed by another consumer at the
    /// same moment): acknowledged, no effect.
    pub duplicates: u64,
    /// Messages kept as dead letters (failed `max_attempts` times, failed permanently,
    /// crashed the consumer too often, or unreadable).
    pub dead_lettered: u64,
    /// Failed handler attempts.
    pub failed_attempts: u64,
}

impl std::ops::AddAssign for ConsumerReport {
    fn add_assign(&mut self, o: Self) {
        self.processed += o.processed;
        self.duplicates += o.duplicates;
        self.dead_lettered += o.dead_lettered;
        self.failed_attempts += o.failed_attempts;
    }
}

/// [`Consumer::max_delivery_bytes`] by default: 16 MiB.
pub const DEFAULT_MAX_DELIVERY_BYTES: usize = 16 * 1024 * 1024;

/// The consumer loop: a [`Source`] feeding an [`Inbox`].
pub struct Consumer<S: Source> {
    source: S,
    inbox: Arc<dyn Inbox>,
    retry: RetryPolicy,
    batch_size: usize,
    wait: Duration,
    max_delivery_bytes: usize,
    /// A batch whose round failed (a database or broker error): retried, whole, before
    /// anything new is received. Brokers do not give it back while this consumer lives
    /// (Kafka's position has moved past it, RabbitMQ keeps it unacknowledged on the channel),
    /// and acknowledging a later batch would cover it (a Kafka offset, a multiple ack).
    unfinished: Option<Vec<Incoming<S::Token>>>,
}

impl<S: Source> std::fmt::Debug for Consumer<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("consumer", &self.inbox.consumer())
            .field("retry", &self.retry)
            .field("batch_size", &self.batch_size)
            .finish_non_exhaustive()
    }
}

impl<S: Source> Consumer<S> {
    /// A consumer of `source` into `inbox`, with the default [`RetryPolicy`] and batches of
    /// up to 100.
    pub fn new(source: S, inbox: impl Inbox + 'static) -> Self {
        Self {
            source,
            inbox: Arc::new(inbox),
            retry: RetryPolicy::default(),
            batch_size: 100,
            wait: Duration::from_millis(500),
            max_delivery_bytes: DEFAULT_MAX_DELIVERY_BYTES,
            unfinished: None,
        }
    }

    /// The largest delivery (payload and headers) that is processed (1 KiB to 1 GiB; default
    /// [`DEFAULT_MAX_DELIVERY_BYTES`]). A larger one is kept as a dead letter without its
    /// payload (its id, source and headers, and the size in the error) and acknowledged:
    /// the handler never sees it, and the inbox table never stores it. Bound the broker
    /// client's own fetch size too (Kafka `fetch.max.bytes`, ...): this limit applies once
    /// a delivery has been received.
    pub fn max_delivery_bytes(mut self, n: usize) -> Result<Self> {
        crate::error::in_range("max_delivery_bytes", n, 1024, 1 << 30)?;
        self.max_delivery_bytes = n;
        Ok(self)
    }

    /// How failed handlers are retried: `max_attempts` attempts (crashes included), then a
    /// dead letter. The same policy type as the relay's.
    pub fn retry(mut self, retry: RetryPolicy) -> Result<Self> {
        retry.validate()?;
        self.retry = retry;
        Ok(self)
    }

    /// Deliveries taken per round (1 to 10 000). The attempts of a batch are counted in one
    /// transaction; each message still commits in its own.
    pub fn batch_size(mut self, n: usize) -> Result<Self> {
        if !(1..=10_000).contains(&n) {
            return Err(Error::config("consumer batch size must be 1 to 10000"));
        }
        self.batch_size = n;
        Ok(self)
    }

    /// How long one round waits for a first delivery (default 500 ms).
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// The source, to inspect or to close.
    pub fn source_mut(&mut self) -> &mut S {
        &mut self.source
    }

    /// Run until `shutdown` completes. The round in progress is then abandoned, not waited
    /// for (a handler's retries can take minutes): its unacknowledged messages come back from
    /// the broker, and those whose effects had committed are recognised by the inbox. Broker
    /// and database errors are logged and retried with backoff; nothing else stops the loop.
    pub async fn run(&mut self, shutdown: impl std::future::Future<Output = ()>) -> ConsumerReport {
        tokio::pin!(shutdown);
        let mut total = ConsumerReport::default();
        let mut errors = 0u32;
        loop {
            let round = tokio::select! {
                biased;
                _ = &mut shutdown => return total,
                r = self.run_once() => r,
            };
            match round {
                Ok(r) => {
                    errors = 0;
                    total += r;
                }
                Err(e) => {
                    errors = errors.saturating_add(1);
                    let delay = self.retry.delay(errors).min(Duration::from_secs(30));
                    tracing::warn!(consumer = self.inbox.consumer(), error = %e, ?delay, "consumer round failed; retrying");
                    tokio::select! {
                        _ = &mut shutdown => return total,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// One round: requeued dead letters first, then one batch from the source, processed and
    /// acknowledged. An error leaves the batch unacknowledged and kept: the next round takes
    /// the same batch again before receiving anything new (the inbox recognises what was
    /// done), so a later batch's acknowledgement never covers it.
    pub async fn run_once(&mut self) -> Result<ConsumerReport> {
        let mut report = ConsumerReport::default();
        for message in self.inbox.requeued(self.batch_size).await? {
            let attempts = match self.inbox.start(&[message.id]).await?.first() {
                Some(Seen::New { attempts }) => *attempts,
                _ => continue,
            };
            self.handle(&message, attempts, &mut report).await?;
        }

        let deliveries = match self.unfinished.take() {
            Some(batch) => batch,
            None => {
                let received = self.source.receive(self.batch_size, self.wait).await?;
                if received.is_empty() {
                    return Ok(report);
                }
                refuse_bad_trace_context(received)
            }
        };
        match self.round(&deliveries, &mut report).await {
            Ok(()) => Ok(report),
            Err(e) => {
                // Nothing of it acknowledged: the next round takes it again (what committed
                // is recognised by the inbox).
                self.unfinished = Some(deliveries);
                Err(e)
            }
        }
    }

    /// Attempts counted, each message processed (or dead-lettered), the batch acknowledged.
    async fn round(
        &mut self,
        deliveries: &[Incoming<S::Token>],
        report: &mut ConsumerReport,
    ) -> Result<()> {
        let ids: Vec<MessageId> = deliveries
            .iter()
            .filter_map(|d| d.message.as_ref().ok().map(|m| m.id))
            .collect();
        let mut seen = self.inbox.start(&ids).await?.into_iter();
        // Oversized deliveries dead-lettered in this round (a second copy is a duplicate).
        let mut oversized: Vec<MessageId> = Vec::new();
        for d in deliveries {
            match &d.message {
                Err(bad) => {
                    let message = Received {
                        id: bad.stable_id(),
                        source: bad.source.clone(),
                        stream: None,
                        key: None,
                        content_type: None,
                        headers: bad.headers.clone(),
                        payload: bad.payload.clone(),
                    };
                    tracing::warn!(consumer = self.inbox.consumer(), id = %message.id, reason = %bad.reason, "unreadable delivery kept as a dead letter");
                    self.inbox
                        .dead_letter(&message, &format!("unreadable delivery: {}", bad.reason))
                        .await?;
                    report.dead_lettered += 1;
                }
                Ok(message) => match seen.next() {
                    Some(Seen::Done) | Some(Seen::Dead) => report.duplicates += 1,
                    Some(Seen::New { .. }) if oversized.contains(&message.id) => {
                        report.duplicates += 1
                    }
                    Some(Seen::New { .. }) if delivery_size(message) > self.max_delivery_bytes => {
                        oversized.push(message.id);
                        let size = delivery_size(message);
                        tracing::warn!(consumer = self.inbox.consumer(), id = %message.id, size, max = self.max_delivery_bytes, "delivery over max_delivery_bytes kept as a dead letter without its payload");
                        let kept = Received {
                            payload: Vec::new(),
                            ..message.clone()
                        };
                        self.inbox
                            .dead_letter(
                                &kept,
                                &format!(
                                    "delivery of {size} bytes is over max_delivery_bytes ({}): kept without its payload",
                                    self.max_delivery_bytes
                                ),
                            )
                            .await?;
                        report.dead_lettered += 1;
                    }
                    Some(Seen::New { attempts }) => self.handle(message, attempts, report).await?,
                    None => {
                        return Err(Error::store(
                            "the inbox answered for fewer messages than it was asked about",
                        ))
                    }
                },
            }
        }
        let tokens = deliveries.iter().map(|d| d.token.clone()).collect();
        self.source.ack(tokens).await
    }

    /// Attempts at one message until it is done, a duplicate, or a dead letter.
    async fn handle(
        &self,
        message: &Received,
        mut attempts: u32,
        report: &mut ConsumerReport,
    ) -> Result<()> {
        let inbox = &self.inbox;
        loop {
            if attempts > self.retry.max_attempts {
                tracing::error!(consumer = inbox.consumer(), id = %message.id, attempts, "message crashed the consumer too often; kept as a dead letter");
                inbox
                    .dead_letter(
                        message,
                        &format!(
                            "crash loop: {} attempts started and none finished",
                            attempts - 1
                        ),
                    )
                    .await?;
                report.dead_lettered += 1;
                return Ok(());
            }
            #[cfg(feature = "otel")]
            let processed = {
                use opentelemetry::context::FutureExt as _;
                let cx = crate::otel::start_process(
                    inbox.consumer(),
                    &message.source,
                    message.id,
                    &message.headers,
                );
                let r = inbox.process(message).with_context(cx.clone()).await;
                crate::otel::end_process(&cx, r.as_ref().err());
                r
            };
            #[cfg(not(feature = "otel"))]
            let processed = inbox.process(message).await;
            let error = match processed {
                Ok(Processed::Done) => {
                    report.processed += 1;
                    return Ok(());
                }
                Ok(Processed::Duplicate) => {
                    report.duplicates += 1;
                    return Ok(());
                }
                Err(e) => e,
            };
            report.failed_attempts += 1;
            let text = crate::printable(&error.to_string()).into_owned();
            let n = inbox.failed(message.id, &text).await?;
            if !error.is_transient() || n >= self.retry.max_attempts {
                tracing::error!(consumer = inbox.consumer(), id = %message.id, attempts = n, error = %error, "handler failed; message kept as a dead letter");
                inbox.dead_letter(message, &text).await?;
                report.dead_lettered += 1;
                return Ok(());
            }
            let delay = error.retry_after().unwrap_or_else(|| self.retry.delay(n));
            tracing::warn!(consumer = inbox.consumer(), id = %message.id, attempts = n, error = %error, ?delay, "handler failed; retrying");
            tokio::time::sleep(delay).await;
            attempts = match inbox.start(&[message.id]).await?.first() {
                Some(Seen::New { attempts }) => *attempts,
                // Processed meanwhile by another consumer of the group.
                Some(Seen::Done | Seen::Dead) => {
                    report.duplicates += 1;
                    return Ok(());
                }
                None => return Err(Error::store("the inbox did not answer for a message")),
            };
        }
    }
}
