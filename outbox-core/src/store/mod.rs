//! The [`Store`] trait: persistence of the outbox table; [`StoreAdmin`], what operators do
//! with it; the values they exchange ([`claim`]'s for the relay and the writers, [`admin`]'s
//! for operators) and the schema's versions ([`schema`]).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::error::Result;
use crate::message::StoredMessage;

pub(crate) mod admin;
pub(crate) mod claim;
pub(crate) mod memory;
pub(crate) mod schema;

pub use admin::*;
pub use claim::*;
pub use schema::*;

/// Persistence of the outbox table.
///
/// Enqueueing happens inside the caller's own transaction, whose type is backend-specific,
/// so it is an inherent method of each backend (it writes the rows that
/// [`Outbox::prepare`](crate::Outbox::prepare) built). Everything the relay, the cleaner and
/// the admin commands need is here.
///
/// # Contract
/// - `claim` returns due, unleased, pending rows and leases them to `claim.owner`. Rows are
///   decoded one by one: a row that does not decode comes back as [`Quarantined`] (still
///   leased) and never fails the other rows of the claim. Row sizes (payload plus headers)
///   are read first: a row whose payload is over `max_row_bytes` comes back [`Quarantined`]
///   without its payload being loaded, and the others are taken in order while they fit `max_batch_bytes`
///   ([`Claim::within_budget`]).
///   Publish-on-commit rows come in `seq` order. A keep-order row is returned only when every
///   earlier pending row of its ordering unit (stream + key) is also returned in the same
///   claim; so a unit whose head is leased elsewhere or backing off yields nothing, and the
///   rows of one unit come in `seq` order. `seq` order is commit order within a unit.
///   A claim should cost O(batch): not grow with the backlog, nor with the rows queued behind
///   a blocked unit (the SQL stores pick due units through an index and read only their first
///   rows).
/// - `complete` marks rows sent (or deletes them) whoever holds them: they were published.
/// - `fail` applies only to rows `owner` still holds (its lease on the row, or, for stores
///   that lease a keep-order unit as a whole, on the row's unit), and releases them.
/// - `settle` is `complete` and `fail` of one batch together; a store may apply it atomically.
/// - Two claims that overlap in time never return the same row while its lease lasts.
/// - A parked unit ([`park_unit`](Store::park_unit)) yields nothing to claims, at no cost
///   (claims pick due units through an index, and a parked unit is never due), until
///   [`resume_unit`](StoreAdmin::resume_unit) or [`skip_head`](StoreAdmin::skip_head); rows written to
///   it meanwhile queue behind it, and nothing else (settling a batch, a requeue) wakes it.
#[async_trait]
pub trait Store: Send + Sync {
    /// Create the table and indexes if they do not exist.
    async fn migrate(&self) -> Result<()>;

    /// Insert rows outside any business transaction (used for on-commit publishes that
    /// failed with `persist_all = false`). Returns their `seq`s.
    async fn insert(&self, rows: &[NewMessage]) -> Result<Vec<i64>>;

    /// Lease a batch of due messages (see the contract above).
    async fn claim(&self, claim: &Claim) -> Result<Vec<Claimed>>;

    /// Mark these rows sent, or delete them when `delete` is true. One statement per batch.
    async fn complete(&self, seqs: &[i64], delete: bool) -> Result<()>;

    /// Record failures (retry later, dead-letter, or release). One round trip per batch.
    async fn fail(&self, owner: &str, failures: &[Failure]) -> Result<()>;

    /// Record a whole batch's outcome: `done` published (marked sent, or deleted when
    /// `delete`), `failures` as in [`fail`](Store::fail). The relay calls this once per batch.
    /// The default calls `complete` then `fail`; stores that keep per-unit state override it
    /// to settle a unit in one step (a unit whose head failed is never seen free between the
    /// two calls) and in one round trip.
    async fn settle(
        &self,
        owner: &str,
        done: &[i64],
        delete: bool,
        failures: &[Failure],
    ) -> Result<()> {
        if !done.is_empty() {
            self.complete(done, delete).await?;
        }
        if !failures.is_empty() {
            self.fail(owner, failures).await?;
        }
        Ok(())
    }

    /// Park the keep-order unit (`stream`, `unit`): its pending rows, in order, leave the
    /// claim path until [`resume_unit`](StoreAdmin::resume_unit) or
    /// [`skip_head`](StoreAdmin::skip_head). A batch a relay already claimed from it finishes.
    /// Parking a parked unit keeps its first reason. A unit without pending rows is an
    /// [`ErrorKind::NotFound`](crate::ErrorKind::NotFound) error.
    async fn park_unit(&self, stream: &str, unit: &str, reason: &str) -> Result<()>;

    /// Wait until new work may be there, or `timeout` passes. The default sleeps; stores that
    /// can hear commits (PostgreSQL NOTIFY, in-process notification) return early.
    async fn wait_for_work(&self, timeout: Duration) {
        tokio::time::sleep(timeout).await;
    }

    /// Get ready to hear commits, before the first claim: [`Relay::run`](crate::Relay::run)
    /// calls this once, so a commit made after it returns wakes the relay (PostgreSQL
    /// establishes `LISTEN` here rather than at the first idle wait, which left a window in
    /// which a commit waited a whole poll interval). An error is logged and the relay polls.
    /// The default does nothing.
    async fn start_listening(&self) -> Result<()> {
        Ok(())
    }

    /// Tell waiting relays in this process that rows were committed. Called after commit by
    /// [`AfterCommit`](crate::AfterCommit); the default does nothing.
    fn notify_committed(&self) {}

    /// What signatures are bound to besides the message (with the
    /// [`Signer`](crate::Signer)'s label): the table's name, so a signed row copied into
    /// another outbox table does not verify. The default is empty.
    fn signing_scope(&self) -> String {
        String::new()
    }
}

/// What operators do with a store (the console, the `outbox` command, [`Cleaner`](crate::Cleaner)):
/// counts, listings, requeue and purge of dead letters, parked units, cleaning. The relay and
/// the writers need only [`Store`]; every method here is required, so a store that cannot
/// do one does not compile instead of failing at run time.
#[async_trait]
pub trait StoreAdmin: Store {
    /// The schema as it is against what [`Store::migrate`] makes: the tables and indexes that
    /// are missing, and those of an older version that `migrate` removes (`outbox doctor`).
    async fn schema(&self) -> Result<SchemaReport>;

    /// Counts per stream.
    async fn stats(&self) -> Result<Stats>;

    /// One row by `seq`, whatever its status. A row that does not decode comes back as
    /// [`StoredMessage::unreadable`] (its status and error, when those decode).
    async fn get(&self, seq: i64) -> Result<Option<StoredMessage>>;

    /// Rows matching `filter`, newest first (`seq` descending), whatever their status; a page
    /// continues from the previous one's last `seq` (`filter.before`), so paging stays an
    /// index range however deep it goes. Rows that do not decode come back as
    /// [`StoredMessage::unreadable`].
    async fn messages(&self, filter: &MessageFilter) -> Result<Vec<StoredMessage>>;

    /// List dead letters, oldest first (by `created_at`, then `seq`; undecodable ones as
    /// [`StoredMessage::unreadable`]). SQL stores read a page through an index.
    async fn dead_letters(&self, stream: Option<&str>, limit: usize) -> Result<Vec<StoredMessage>>;

    /// Move dead letters back to pending with zero attempts. Returns how many.
    async fn requeue(&self, selector: &Selector) -> Result<u64>;

    /// Delete dead letters. Returns how many.
    async fn purge_dead(&self, selector: &Selector) -> Result<u64>;

    /// Parked units, oldest parked first (of `stream` only, when given), at most `limit`.
    async fn parked_units(&self, stream: Option<&str>, limit: usize) -> Result<Vec<ParkedUnit>>;

    /// Resume a parked unit: its rows are published again in their order, from the head,
    /// with a fresh retry budget (attempts reset). A unit that is not parked is an
    /// [`ErrorKind::NotFound`](crate::ErrorKind::NotFound) error, and nothing changes.
    async fn resume_unit(&self, stream: &str, unit: &str) -> Result<()>;

    /// Dead-letter the head of a parked unit (just that message), then resume the rest.
    /// Returns the head's `seq` (`None` when the unit had no pending row left). A unit that is
    /// not parked is an [`ErrorKind::NotFound`](crate::ErrorKind::NotFound) error.
    async fn skip_head(&self, stream: &str, unit: &str) -> Result<Option<i64>>;

    /// Delete at most `limit` sent rows published before `sent_before` (and dead rows
    /// created before it when `include_dead`). Never touches pending rows. Returns how many.
    async fn clean(&self, sent_before: SystemTime, limit: usize, include_dead: bool)
        -> Result<u64>;
}

/// A store that writes outbox rows in its users' asynchronous transactions of type `Tx`
/// (`sqlx::Transaction<'_, Postgres>` for the PostgreSQL store, say). Users call
/// [`Outbox::enqueue`](crate::Outbox::enqueue), which validates, signs and then calls this.
/// Taking the transaction type (not a bare connection) is the point: a keep-order row's unit
/// lock lasts until the transaction ends, which an autocommit connection would not do.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot enqueue in a `{Tx}` with `enqueue(...).await`",
    label = "`Outbox::enqueue` takes the store's own asynchronous transaction",
    note = "SQLite (rusqlite) and MemoryStore transactions are synchronous: call `outbox.enqueue_blocking(&mut tx, messages)` instead",
    note = "PostgreSQL and MySQL take `&mut sqlx::Transaction` (from `store.pool().begin().await`), not a connection or a pool"
)]
#[async_trait]
pub trait Enqueue<Tx: Send + ?Sized>: Store {
    /// Write `rows` in `tx`, in order, all or none. Returns their `seq`s in the same order;
    /// when `need_seqs` is false the caller does not use them and a store may return any
    /// values of the right length.
    async fn write_rows(
        &self,
        tx: &mut Tx,
        rows: &[NewMessage],
        need_seqs: bool,
    ) -> Result<Vec<i64>>;

    /// How deeply `tx` is nested: 1 for an outermost transaction, 2 or more for a savepoint
    /// (a nested transaction of the same type, as sqlx's `Transaction::begin` on a
    /// transaction makes). [`Outbox::enqueue`](crate::Outbox::enqueue) refuses to publish
    /// after committing a savepoint: releasing one commits nothing, and its parent may still
    /// roll back. The default, 1, is right for stores whose savepoints have a type of their
    /// own.
    fn transaction_depth(&self, tx: &Tx) -> usize {
        let _ = tx;
        1
    }
}

/// [`Enqueue`] for stores whose transactions are synchronous (SQLite's
/// `rusqlite::Transaction`, [`MemoryTx`](crate::MemoryTx)). Users call
/// [`Outbox::enqueue_blocking`](crate::Outbox::enqueue_blocking).
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot enqueue in a `{Tx}` with `enqueue_blocking`",
    label = "`Outbox::enqueue_blocking` takes the store's own synchronous transaction",
    note = "PostgreSQL and MySQL transactions are asynchronous: call `outbox.enqueue(&mut tx, messages).await` instead",
    note = "SQLite takes `&mut rusqlite::Transaction` (from `store.connect()?.transaction()?`)"
)]
pub trait EnqueueBlocking<Tx: ?Sized>: Store {
    /// As [`Enqueue::write_rows`].
    fn write_rows_blocking(
        &self,
        tx: &mut Tx,
        rows: &[NewMessage],
        need_seqs: bool,
    ) -> Result<Vec<i64>>;
}

#[async_trait]
impl<Tx: Send + ?Sized, S: Enqueue<Tx> + ?Sized> Enqueue<Tx> for Arc<S> {
    async fn write_rows(
        &self,
        tx: &mut Tx,
        rows: &[NewMessage],
        need_seqs: bool,
    ) -> Result<Vec<i64>> {
        (**self).write_rows(tx, rows, need_seqs).await
    }

    fn transaction_depth(&self, tx: &Tx) -> usize {
        (**self).transaction_depth(tx)
    }
}

impl<Tx: ?Sized, S: EnqueueBlocking<Tx> + ?Sized> EnqueueBlocking<Tx> for Arc<S> {
    fn write_rows_blocking(
        &self,
        tx: &mut Tx,
        rows: &[NewMessage],
        need_seqs: bool,
    ) -> Result<Vec<i64>> {
        (**self).write_rows_blocking(tx, rows, need_seqs)
    }
}

macro_rules! forward_store {
    ($($ty:ty),*) => {$(
        #[async_trait]
        impl<T: Store + ?Sized> Store for $ty {
            async fn migrate(&self) -> Result<()> { (**self).migrate().await }
            async fn insert(&self, rows: &[NewMessage]) -> Result<Vec<i64>> { (**self).insert(rows).await }
            async fn claim(&self, claim: &Claim) -> Result<Vec<Claimed>> { (**self).claim(claim).await }
            async fn complete(&self, seqs: &[i64], delete: bool) -> Result<()> { (**self).complete(seqs, delete).await }
            async fn fail(&self, owner: &str, failures: &[Failure]) -> Result<()> { (**self).fail(owner, failures).await }
            async fn settle(&self, owner: &str, done: &[i64], delete: bool, failures: &[Failure]) -> Result<()> { (**self).settle(owner, done, delete, failures).await }
            async fn wait_for_work(&self, timeout: Duration) { (**self).wait_for_work(timeout).await }
            async fn park_unit(&self, stream: &str, unit: &str, reason: &str) -> Result<()> { (**self).park_unit(stream, unit, reason).await }
            async fn start_listening(&self) -> Result<()> { (**self).start_listening().await }
            fn notify_committed(&self) { (**self).notify_committed() }
            fn signing_scope(&self) -> String { (**self).signing_scope() }
        }
    )*};
}

macro_rules! forward_store_admin {
    ($($ty:ty),*) => {$(
        #[async_trait]
        impl<T: StoreAdmin + ?Sized> StoreAdmin for $ty {
            async fn schema(&self) -> Result<SchemaReport> { (**self).schema().await }
            async fn requeue(&self, selector: &Selector) -> Result<u64> { (**self).requeue(selector).await }
            async fn purge_dead(&self, selector: &Selector) -> Result<u64> { (**self).purge_dead(selector).await }
            async fn dead_letters(&self, stream: Option<&str>, limit: usize) -> Result<Vec<StoredMessage>> { (**self).dead_letters(stream, limit).await }
            async fn clean(&self, sent_before: SystemTime, limit: usize, include_dead: bool) -> Result<u64> { (**self).clean(sent_before, limit, include_dead).await }
            async fn stats(&self) -> Result<Stats> { (**self).stats().await }
            async fn get(&self, seq: i64) -> Result<Option<StoredMessage>> { (**self).get(seq).await }
            async fn resume_unit(&self, stream: &str, unit: &str) -> Result<()> { (**self).resume_unit(stream, unit).await }
            async fn skip_head(&self, stream: &str, unit: &str) -> Result<Option<i64>> { (**self).skip_head(stream, unit).await }
            async fn parked_units(&self, stream: Option<&str>, limit: usize) -> Result<Vec<ParkedUnit>> { (**self).parked_units(stream, limit).await }
            async fn messages(&self, filter: &MessageFilter) -> Result<Vec<StoredMessage>> { (**self).messages(filter).await }
        }
    )*};
}

forward_store_admin!(&T, Box<T>, Arc<T>);

forward_store!(&T, Box<T>, Arc<T>);

/// The message of a [`Store::park_unit`], [`StoreAdmin::resume_unit`] or [`StoreAdmin::skip_head`]
/// of a unit that does not exist or is not parked.
pub fn no_such_unit(stream: &str, unit: &str, parked: bool) -> crate::Error {
    let short = |t: &str| crate::printable(&t.chars().take(255).collect::<String>()).into_owned();
    let (s, u) = (short(stream), short(unit));
    crate::Error::not_found(if parked {
        format!("unit {u:?} of stream {s:?} is not parked")
    } else {
        format!("stream {s:?} has no unit {u:?} with pending keep-order messages")
    })
}
