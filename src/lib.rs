//! # outbox
//!
//! A broker-agnostic transactional outbox for Rust services. Write messages into an outbox
//! table **in the same database transaction** as your business data; publish-on-commit
//! messages go out right after the commit, and a [`Relay`] publishes the rest (and retries
//! failures) until the broker has them. A rolled-back transaction never announces anything;
//! a committed one is always announced, even if the broker is down or the process dies
//! right after the commit.
//!
//! Backends are features of this crate:
//!
//! | feature    | module             | what                                  |
//! |------------|--------------------|---------------------------------------|
//! | `sqlite`   | [`sqlite`] (default) | embedded SQLite store (rusqlite)    |
//! | `postgres` | `postgres`         | PostgreSQL store (sqlx), LISTEN/NOTIFY |
//! | `mysql`    | `mysql`            | MySQL / MariaDB store (sqlx)          |
//! | `kafka`    | `kafka`            | Kafka publisher (rdkafka)             |
//! | `amqp`     | `amqp`             | RabbitMQ publisher (lapin)            |
//! | `redis`    | `redis`            | Redis Streams / Pub/Sub publisher     |
//!
//! Everything in [`outbox_core`] is re-exported at the top level.
//!
//! Start with `examples/quickstart.rs` (`cargo run --example quickstart`): SQLite, a business
//! transaction committed and one rolled back, publish-on-commit and keep-order streams, and a
//! relay, with no services needed.
#![forbid(unsafe_code)]

pub use outbox_core::*;

/// Embedded SQLite store (feature `sqlite`, on by default).
#[cfg(feature = "sqlite")]
pub use outbox_sqlite as sqlite;

/// PostgreSQL store (feature `postgres`).
#[cfg(feature = "postgres")]
pub use outbox_sql::postgres;

/// MySQL / MariaDB store (feature `mysql`).
#[cfg(feature = "mysql")]
pub use outbox_sql::mysql;

/// Kafka publisher (feature `kafka`).
/// The inbox on PostgreSQL and MySQL / MariaDB (consumer side).
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub use outbox_sql::inbox as sql_inbox;

#[cfg(feature = "kafka")]
pub use outbox_kafka as kafka;

/// RabbitMQ publisher (feature `amqp`).
#[cfg(feature = "amqp")]
pub use outbox_amqp as amqp;

/// Redis publisher (feature `redis`).
#[cfg(feature = "redis")]
pub use outbox_redis as redis;

/// HTTP webhook publisher, Standard Webhooks signatures (feature `webhook`).
#[cfg(feature = "webhook")]
pub use outbox_webhook as webhook;

/// NATS JetStream publisher (feature `nats`).
#[cfg(feature = "nats")]
pub use outbox_nats as nats;
