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

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::Result;
use crate::message::MessageId;

mod consumer;
mod delivery;

pub use consumer::*;
pub use delivery::*;

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

/// The result of [`Inbox::process_batch`].
#[derive(Debug)]
pub enum BatchProcessed {
    /// The batch committed: for each message, in order, whether its handler ran
    /// ([`Processed::Done`]) or it was done already ([`Processed::Duplicate`]; a second copy of
    /// an id in the same batch is one too).
    Committed(Vec<Processed>),
    /// The handler failed on `messages[index]` with `error`: the batch's transaction was
    /// rolled back, nothing of it is marked done (an implementation that commits message by
    /// message may have committed the ones before `index`: processing them again finds
    /// them done).
    Failed {
        /// The message whose handler failed.
        index: usize,
        /// The handler's error, as it returned it.
        error: crate::error::Error,
    },
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

    /// Batched mode ([`Consumer::batched`]): in **one** transaction, for each message in
    /// order, mark it done unless another delivery already did and run the handler's writes;
    /// commit once. A handler error rolls the whole batch back and says which message failed.
    ///
    /// By default each message goes through [`process`](Self::process) in its own
    /// transaction (correct, not faster); the SQL and SQLite inboxes implement the one
    /// transaction.
    async fn process_batch(&self, messages: &[&Received]) -> Result<BatchProcessed> {
        let mut out = Vec::with_capacity(messages.len());
        for (index, m) in messages.iter().enumerate() {
            match self.process(m).await {
                Ok(p) => out.push(p),
                Err(error) => return Ok(BatchProcessed::Failed { index, error }),
            }
        }
        Ok(BatchProcessed::Committed(out))
    }

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
            async fn process_batch(&self, messages: &[&Received]) -> Result<BatchProcessed> {
                (**self).process_batch(messages).await
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
