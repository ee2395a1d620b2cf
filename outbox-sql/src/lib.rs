//! PostgreSQL (feature `postgres`) and MySQL / MariaDB (feature `mysql`) stores for the
//! `outbox` framework, on sqlx.
//!
//! Both enqueue inside the caller's own sqlx transaction, claim batches with a lease in one
//! short transaction, settle a batch's outcome in one transaction, and keep commit order per
//! ordering unit with several relays at once:
//!
//! - **Enqueue**: keep-order rows first lock their ordering unit's row (PostgreSQL:
//!   `<table>_units`; MySQL: `<table>_locks`) until the transaction ends, so two transactions
//!   writing the same unit are serialized and `seq` order is commit order. Transactions on
//!   different units never wait for each other.
//! - **Claim**: no table-wide lock. A claim picks due keep-order *units* from `<table>_due`
//!   (one row per unit with pending rows, and when it may be claimed next: now when free, the
//!   lease's end while leased, its head's retry time while backing off) through an index,
//!   locks them with `FOR UPDATE SKIP LOCKED`, and reads each unit's first rows through the
//!   unit index; publish-on-commit rows left to the relay come through an index of their own.
//!   A unit is claimed by one relay at a time (so a second relay never sees message 2 free
//!   while message 1 is in flight), a blocked unit's rows are never read, and a claim costs
//!   O(batch) whatever the backlog. Keep-order units are leased as a whole: no keep-order row
//!   is rewritten by a claim. Every lock the stores take is a row of the outbox's own tables:
//!   a role without privileges on them cannot take it, so it cannot stall relays or writers,
//!   and claims skip what they find locked instead of waiting.
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
pub use common::{map_err, redact_url};

/// A store chosen at run time from its URL: SQLite, PostgreSQL or MySQL / MariaDB (feature
/// `any`).
#[cfg(feature = "any")]
pub mod any;

/// Least-privilege roles: the grants of the writer, the relay and the console.
pub mod roles;

/// The inbox (consumer side) on PostgreSQL and MySQL / MariaDB.
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub mod inbox;
