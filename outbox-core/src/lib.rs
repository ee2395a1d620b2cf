//! Core of the `outbox` transactional outbox framework: the [`Store`], [`Publisher`] and
//! [`Strategy`] abstractions, the [`Relay`] engine, the [`Cleaner`], retry policy, signing,
//! observer hooks, an in-memory store and publishers that need no broker.
//!
//! This crate depends on no database or broker; backends live in `outbox-sqlite`,
//! `outbox-sql`, `outbox-kafka`, `outbox-amqp` and `outbox-redis`, re-exported by the
//! `outbox` facade crate behind features.
//!
//! ```
//! use outbox_core::{KeepOrder, MemoryStore, Message, Outbox, RecordingPublisher};
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> outbox_core::Result<()> {
//! let store = MemoryStore::new();
//! let broker = RecordingPublisher::new();
//! let outbox = Outbox::builder(store.clone(), broker.clone())
//!     .stream_strategy("orders", KeepOrder::default())
//!     .build()?;
//!
//! // In the business transaction:
//! let mut tx = store.begin();
//! let after = outbox.enqueue_blocking(
//!     &mut tx,
//!     [Message::json("orders.placed", &serde_json::json!({"id": 1}))?.stream("orders")],
//! )?;
//! tx.commit();                     // commit the business data and the outbox rows at once
//! after.dispatch();                // publish-on-commit messages go now; keep-order wakes relays
//!
//! // A relay publishes keep-order streams (and retries failed publish-on-commit messages):
//! let relay = outbox.relay().build()?;
//! relay.run_once().await?;
//! assert_eq!(broker.count(), 1);
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod cleaner;
mod error;
mod inbox;
mod message;
mod observer;
mod outbox;
mod publisher;
mod redact;
mod relay;
mod retry;
mod settings;
mod signing;
mod store;
mod strategy;
pub mod tls;
mod trace;

#[cfg(feature = "otel")]
pub mod otel;

#[cfg(feature = "testing")]
pub mod conformance;

pub use cleaner::{cutoff, Cleaner, DEFAULT_RETENTION, MAX_RETENTION};
pub use error::{validate_identifier, Error, ErrorKind, Result, Retry};
pub use inbox::{
    parse_id, BatchProcessed, Consumer, ConsumerReport, Inbox, InboxAdmin, InboxDeadLetter,
    Incoming, Processed, Received, Seen, Source, Unreadable, DEFAULT_MAX_DELIVERY_BYTES, ID_HEADER,
};
pub use message::{
    from_millis, to_millis, Encoder, Envelope, JsonEncoder, Message, MessageId, Status,
    StoredMessage, DEFAULT_STREAM, MAX_HEADERS, MAX_HEADER_VALUE, RESERVED_HEADERS,
};
pub use observer::{Event, Observer, PublishPath};
pub use outbox::{AfterCommit, DispatchReport, HeaderInjector, Outbox, OutboxBuilder, Prepared};
pub use publisher::{
    publish_with_timeout, single_result, FaultFn, FaultyPublisher, FunctionPublisher,
    NullPublisher, Publisher, RecordingPublisher, Router, StdoutPublisher,
};
pub use redact::{is_secret_param, printable, redact_url};
pub use relay::{
    BatchReport, Fleet, FleetBuilder, MemberState, MemberStatus, OpenStore, Relay, RelayBuilder,
    RelayConfig, RelayHealth,
};
pub use retry::{Decision, RetryPolicy};
pub use settings::{Config, Delivery};
pub use signing::{check_signature, SignedPlan, Signer, SigningKey};
pub use store::memory::{MemoryStore, MemoryTx};
pub use store::{
    no_such_unit, Claim, Claimed, Enqueue, EnqueueBlocking, Failure, MessageFilter, NewMessage,
    Outcome, ParkedUnit, Quarantined, SchemaReport, SchemaStep, Selector, Stats, Store, StoreAdmin,
    StreamFilter, StreamStats, DEFAULT_MAX_BATCH_BYTES, MAX_PAGE, PARKED_COUNT_CAP, PARKED_NEXT_AT,
    SCHEMA_STEPS, SCHEMA_VERSION,
};
pub use strategy::{
    builtin as builtin_strategy, Exhausted, KeepOrder, Order, Plan, PublishOnCommit, PublishedBy,
    RelayOnly, Schedule, Strategy, Unit,
};
pub use trace::valid_traceparent;

/// Re-exported for backends and users implementing the traits.
pub use async_trait::async_trait;
