//! # outbox
//!
//! A broker-agnostic transactional outbox for Rust services. Write messages into an outbox
//! table **in the same database transaction** as your business data; publish-on-commit
//! messages go out right after the commit, and a [`Relay`] publishes the rest (and retries
//! failures) until the broker has them. A rolled-back transaction never announces anything;
//! a committed one is always announced, even if the broker is down or the process dies
//! right after the commit.
//!
//! ```
//! use outbox::sqlite::{self, SqliteStore};
//! use outbox::{KeepOrder, Message, Outbox, RecordingPublisher};
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # let path = dir.path().join("shop.db");
//! let store = SqliteStore::open(&path)?; // a file; its outbox table:
//! store.migrate_now()?;
//! let broker = RecordingPublisher::new(); // or a Kafka, RabbitMQ, Redis, NATS, webhook publisher
//! let outbox = Outbox::builder(store.clone(), broker.clone())
//!     .stream_strategy("orders", KeepOrder::default()) // a relay publishes these, in order per key
//!     .build()?;
//!
//! // The business write and its message in one transaction:
//! let mut conn = store.connect()?;
//! let mut tx = conn.transaction()?;
//! tx.execute("CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY)", [])?;
//! tx.execute("INSERT INTO orders (id) VALUES (?1)", [42])?;
//! let msg = Message::new("orders.placed", br#"{"id":42}"#.to_vec())
//!     .stream("orders")
//!     .key("customer-7");
//! let after = outbox.enqueue_blocking(&mut tx, [msg])?;
//! sqlite::commit(tx, after)?; // commit, then publish-on-commit messages and wake the relays
//!
//! // A relay publishes (and retries) until the broker has it:
//! outbox.relay().build()?.run_once().await?;
//! assert_eq!(broker.count(), 1);
//! # Ok(()) }
//! ```
//!
//! ## Features
//!
//! | feature | what | module |
//! |---|---|---|
//! | `sqlite` (default) | embedded SQLite store (rusqlite) | [`sqlite`] |
//! | `postgres` | PostgreSQL store (sqlx), `LISTEN`/`NOTIFY` wake-up, and its inbox | `postgres`, `sql_inbox` |
//! | `pg-wal` | the WAL relay: a table-less writer (`pg_logical_emit_message`) and a relay over a logical replication slot | `postgres::wal` |
//! | `mysql` | MySQL / MariaDB store (sqlx), and its inbox | `mysql`, `sql_inbox` |
//! | `any` | a store chosen at run time from its URL, whose transaction enqueues on whichever database it holds (`sqlite`, `postgres`, `mysql`) | `any` |
//! | `kafka` | Kafka publisher and inbox source (rdkafka) | `kafka` |
//! | `amqp` | RabbitMQ publisher (publisher confirms) and inbox source (lapin) | `amqp` |
//! | `redis` | Redis Streams / Pub/Sub publisher and inbox source | `redis` |
//! | `nats` | NATS JetStream publisher and inbox source | `nats` |
//! | `webhook` | HTTP webhook publisher, Standard Webhooks signatures | `webhook` |
//! | `tls` (default) | TLS to every database and broker (rustls; librdkafka's OpenSSL) | |
//! | `otel` | W3C trace context from the writer through the relay to the inbox (OpenTelemetry) | `otel` |
//! | `all-backends` | every store and broker, and `tls` | |
//!
//! (The backend modules are documented when their feature is on: `cargo doc --features
//! all-backends --open`.)
//!
//! ## Where things are
//!
//! At the root: what an application uses (the [`Outbox`], messages, strategies, the
//! [`Relay`], the [`Cleaner`], publishers that need no broker, the [`Store`] operations
//! operators call, errors, observers, signing, and the consumer side: [`Consumer`],
//! [`Inbox`], [`Received`]). In [`implement`]: what writing a store, a publisher or a source
//! needs beyond that. `examples/quickstart.rs` (`cargo run --example quickstart`) is a longer
//! tour with no services needed.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![deny(rustdoc::broken_intra_doc_links)]
#![cfg_attr(docsrs, feature(doc_cfg))]

// Everything of the core stays reachable at the root (for code written against it), but the
// documentation shows the curated list below and the `implement` module.
#[doc(hidden)]
pub use outbox_core::*;

// Writing messages.
pub use outbox_core::{
    AfterCommit, DispatchReport, Encoder, Envelope, HeaderInjector, JsonEncoder, Message,
    MessageId, Outbox, OutboxBuilder, Prepared, Status, StoredMessage,
};
// Who publishes what, in which order.
pub use outbox_core::{
    builtin_strategy, Exhausted, KeepOrder, Order, Plan, PublishOnCommit, PublishedBy, RelayOnly,
    Schedule, Strategy, Unit,
};
// Publishing and cleaning.
pub use outbox_core::{
    BatchReport, Cleaner, Config, Decision, Delivery, Fleet, FleetBuilder, MemberState,
    MemberStatus, Relay, RelayBuilder, RelayConfig, RelayHealth, RetryPolicy, DEFAULT_RETENTION,
    MAX_RETENTION,
};
// Publishers that need no broker, and the trait for your own.
pub use outbox_core::{
    FunctionPublisher, NullPublisher, Publisher, RecordingPublisher, Router, StdoutPublisher,
};
// Stores as operators use them, and the in-memory one.
pub use outbox_core::{
    MemoryStore, MemoryTx, MessageFilter, ParkedUnit, SchemaReport, SchemaStep, Selector, Stats,
    Store, StoreAdmin, StreamFilter, StreamStats, SCHEMA_STEPS, SCHEMA_VERSION,
};
// Errors, observing, signing, secrets in output.
pub use outbox_core::{
    printable, redact_url, Error, ErrorKind, Event, Observer, PublishPath, Result, Retry, Signer,
    SigningKey,
};
// The consumer side.
/// Re-exported for implementing the traits (`#[outbox::async_trait]`).
pub use outbox_core::async_trait;
pub use outbox_core::{
    BatchProcessed, Consumer, ConsumerReport, Inbox, InboxAdmin, InboxDeadLetter, Incoming,
    Processed, Received, Seen, Source, Unreadable, DEFAULT_MAX_DELIVERY_BYTES, ID_HEADER,
};

/// The names most programs use, in one import: the outbox and its messages, the built-in
/// strategies, the relay, and the traits whose methods they call.
///
/// ```
/// use outbox::prelude::*;
///
/// let outbox = Outbox::builder(outbox::MemoryStore::new(), outbox::NullPublisher)
///     .stream_strategy("orders", KeepOrder::default())
///     .build()
///     .unwrap();
/// let message = Message::new("orders.placed", b"{}".to_vec()).stream("orders");
/// let prepared = outbox.prepare([message]).unwrap();
/// assert_eq!(prepared.rows().len(), 1);
/// ```
pub mod prelude {
    pub use outbox_core::{
        KeepOrder, Message, Outbox, PublishOnCommit, Publisher, Relay, RelayOnly, Store, StoreAdmin,
    };
}

/// What implementing a store, a publisher or an inbox source needs beyond the root: the
/// claim and settle types, the enqueue traits, limits, and helpers the bundled backends use.
pub mod implement {
    /// TLS files named in URLs, checked at start-up.
    pub use outbox_core::tls;
    pub use outbox_core::{
        cutoff, from_millis, is_secret_param, no_such_unit, parse_id, single_result, to_millis,
        valid_traceparent, validate_identifier, Claim, Claimed, Enqueue, EnqueueBlocking, Failure,
        FaultFn, FaultyPublisher, NewMessage, Outcome, Quarantined, SignedPlan,
        DEFAULT_MAX_BATCH_BYTES, DEFAULT_STREAM, MAX_HEADERS, MAX_HEADER_VALUE, MAX_PAGE,
        PARKED_COUNT_CAP, PARKED_NEXT_AT, RESERVED_HEADERS,
    };
}

#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
#[doc(inline)]
pub use outbox_sqlite as sqlite;

#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
#[doc(inline)]
pub use outbox_sql::postgres;

#[cfg(feature = "mysql")]
#[cfg_attr(docsrs, doc(cfg(feature = "mysql")))]
#[doc(inline)]
pub use outbox_sql::mysql;

#[cfg(any(feature = "postgres", feature = "mysql"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "postgres", feature = "mysql"))))]
#[doc(inline)]
pub use outbox_sql::inbox as sql_inbox;

#[cfg(feature = "any")]
#[cfg_attr(docsrs, doc(cfg(feature = "any")))]
#[doc(inline)]
pub use outbox_sql::any;

#[cfg(feature = "kafka")]
#[cfg_attr(docsrs, doc(cfg(feature = "kafka")))]
#[doc(inline)]
pub use outbox_kafka as kafka;

#[cfg(feature = "amqp")]
#[cfg_attr(docsrs, doc(cfg(feature = "amqp")))]
#[doc(inline)]
pub use outbox_amqp as amqp;

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
#[doc(inline)]
pub use outbox_redis as redis;

#[cfg(feature = "webhook")]
#[cfg_attr(docsrs, doc(cfg(feature = "webhook")))]
#[doc(inline)]
pub use outbox_webhook as webhook;

#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
#[doc(inline)]
pub use outbox_nats as nats;

#[cfg(feature = "otel")]
#[cfg_attr(docsrs, doc(cfg(feature = "otel")))]
#[doc(inline)]
pub use outbox_core::otel;
