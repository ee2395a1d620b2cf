//! PostgreSQL (feature `postgres`) and MySQL / MariaDB (feature `mysql`) stores for the
//! `outbox` framework, on sqlx.
//!
//! Both enqueue inside the caller's own sqlx transaction, claim batches with a lease in one
//! short transaction, acknowledge a batch in one statement, and keep commit order per
//! ordering unit with several relays at once:
//!
//! - **Enqueue**: keep-order rows first lock their ordering unit's row (PostgreSQL:
//!   `<table>_units`; MySQL: `<table>_locks`) until the transaction ends, so two transactions
//!   writing the same unit are serialized and `seq` order is commit order. Transactions on
//!   different units never wait for each other.
//! - **Claim**: claims on one table are serialized by the one row of `<table>_claim`, waited
//!   for at most `lock_timeout` (a longer wait is a transient error the relay logs and
//!   retries), and commit their lease before the next claim reads. Every lock the stores take
//!   is a row of the outbox's own tables: a role without privileges on them cannot take it,
//!   so it cannot stall relays or writers. `FOR UPDATE SKIP LOCKED` alone is not enough:
//!   a second relay would see message 2 of a unit as free while message 1 is locked but not
//!   yet leased, and publish it first. Claims are one short statement; publishing, the slow
//!   part, runs in parallel across relays.
//! - **Wake-up** (PostgreSQL): a keep-order enqueue sends `NOTIFY <table>` in the transaction;
//!   relays `LISTEN` and wake within milliseconds of the commit, and poll only as a fallback.
//!
//! Timestamps are milliseconds since the epoch (`BIGINT`), taken from the database clock for
//! leases and retry times, so relays on hosts with skewed clocks still agree.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

/// The sqlx version the stores are built with, for the application's transactions.
pub use sqlx;

#[cfg(any(feature = "postgres", feature = "mysql"))]
mod common;

/// PostgreSQL store (feature `postgres`).
#[cfg(feature = "postgres")]
pub mod postgres;

/// MySQL / MariaDB store (feature `mysql`).
#[cfg(feature = "mysql")]
pub mod mysql;

#[cfg(any(feature = "postgres", feature = "mysql"))]
pub use common::redact_url;
