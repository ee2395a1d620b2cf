//! The [`Store`] trait: persistence of the outbox table.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::message::{Envelope, Status, StoredMessage};
use crate::strategy::{Exhausted, Order, PublishedBy};

/// Which streams a relay serves.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StreamFilter {
    /// Every stream.
    #[default]
    All,
    /// Only these streams (never empty: an empty list is rejected by the relay builder).
    Only(Vec<String>),
}

impl StreamFilter {
    /// True when `stream` passes the filter.
    pub fn matches(&self, stream: &str) -> bool {
        match self {
            StreamFilter::All => true,
            StreamFilter::Only(list) => list.iter().any(|s| s == stream),
        }
    }
}

/// A request to lease a batch of due messages.
#[derive(Debug, Clone)]
pub struct Claim {
    /// Who holds the lease (a relay's unique id).
    pub owner: String,
    /// Which streams.
    pub streams: StreamFilter,
    /// At most this many rows.
    pub limit: usize,
    /// How long the lease lasts; after that another relay may take the rows.
    pub lease: Duration,
    /// A row whose payload alone takes more bytes is returned [`Quarantined`] without its
    /// payload being read (it is over the limit however its headers are counted). Rows that
    /// are loaded are checked by the relay against the one definition of a message's size,
    /// [`Message::size`](crate::Message::size), as at enqueue.
    pub max_row_bytes: usize,
    /// The rows of one claim take at most this many bytes (payload plus headers), or one row
    /// when a single row is larger; the rest waits for the next claim.
    pub max_batch_bytes: usize,
}

impl Claim {
    /// A claim with the default byte limits (1 MiB a row, 32 MiB a batch).
    pub fn new(
        owner: impl Into<String>,
        streams: StreamFilter,
        limit: usize,
        lease: Duration,
    ) -> Self {
        Self {
            owner: owner.into(),
            streams,
            limit,
            lease,
            max_row_bytes: 1024 * 1024,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
        }
    }

    /// Which of `sizes` (in claim order) this claim takes: oversized rows are always taken
    /// (to be quarantined; they cost nothing), the others while the running total stays within
    /// `max_batch_bytes` (always at least one).
    pub fn within_budget(&self, sizes: &[usize]) -> Vec<bool> {
        let mut total = 0usize;
        let mut any = false;
        sizes
            .iter()
            .map(|&size| {
                if size > self.max_row_bytes {
                    return true;
                }
                let fits = !any || total + size <= self.max_batch_bytes;
                if fits {
                    total += size;
                    any = true;
                }
                fits
            })
            .collect()
    }

    /// The reason a row of `size` bytes is quarantined.
    pub fn oversized(&self, size: usize) -> String {
        format!(
            "payload and headers take {size} bytes, over the limit of {} bytes (not loaded)",
            self.max_row_bytes
        )
    }
}

/// Default byte budget of one claim.
pub const DEFAULT_MAX_BATCH_BYTES: usize = 32 * 1024 * 1024;

/// A claimed row that cannot be read back as a message (a column that does not decode:
/// headers that are not a JSON map of strings, an unknown strategy, an id that is not a UUID,
/// a name that is not UTF-8, a negative count, ...). Rows are input: another service, an
/// operator or an attacker may have written them. The relay dead-letters a quarantined row
/// with `reason` as its error and goes on with the rest of the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    /// The row's sequence number.
    pub seq: i64,
    /// The row's id as stored, when it could be read as text.
    pub id: Option<String>,
    /// Which column failed and why.
    pub reason: String,
}

/// One row of a claim: the message, or why it could not be read.
pub type Claimed = std::result::Result<StoredMessage, Quarantined>;

/// A row to insert: built by [`Outbox::prepare`](crate::Outbox::prepare), written by a backend.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// Id, creation time and message.
    pub envelope: Envelope,
    /// How it is claimed (the strategy's unit answer).
    pub order: Order,
    /// Its ordering unit within the stream (empty: the stream's unit, or unordered).
    pub unit: String,
    /// What exhaustion does (the strategy's answer).
    pub exhausted: Exhausted,
    /// Who publishes it first.
    pub published_by: PublishedBy,
    /// HMAC signature when signing is on.
    pub signature: Option<String>,
    /// Initial status (pending, or dead for a permanent on-commit failure).
    pub status: Status,
    /// Attempts already made (non-zero only for rows written after a failed on-commit publish).
    pub attempts: u32,
    /// Delay from the write until the first relay attempt, by the database's clock (a
    /// schedule's delay, or the backoff after a failed on-commit publish).
    pub retry_after: Duration,
    /// And not before this time, by the database's clock ([`Schedule::At`](crate::Schedule::At)).
    pub not_before: Option<SystemTime>,
    /// The error of the failed on-commit publish.
    pub last_error: Option<String>,
    /// A lease held from the start (publish-on-commit rows are leased to the committing
    /// process so that no relay races it; if it dies, the lease expires).
    pub lease: Option<(String, Duration)>,
}

/// What to do with a message whose publish failed or was skipped.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Count an attempt, store the error, and make it due again after the delay.
    Retry {
        /// Delay until the next attempt.
        after: Duration,
    },
    /// Count an attempt and move it to the dead letters.
    Dead,
    /// Give the lease back without counting an attempt (a keep-order message behind a
    /// failed head, or a batch cut short).
    Release,
}

/// A failed (or skipped) message in a batch.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The row.
    pub seq: i64,
    /// The error text stored in `last_error` (ignored for [`Outcome::Release`]).
    pub error: String,
    /// What to do.
    pub outcome: Outcome,
}

/// Which dead (or all) messages an admin operation applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// All of them.
    All,
    /// One stream's.
    Stream(String),
    /// These rows.
    Seqs(Vec<i64>),
}

/// Which rows [`StoreAdmin::messages`] lists: every field set narrows the listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageFilter {
    /// Only this stream.
    pub stream: Option<String>,
    /// Only this status.
    pub status: Option<Status>,
    /// Only this message key.
    pub key: Option<String>,
    /// Only this message id.
    pub id: Option<crate::MessageId>,
    /// Only this destination.
    pub destination: Option<String>,
    /// Keyset pagination, newest first: only rows with a smaller `seq` (the last `seq` of the
    /// previous page).
    pub before: Option<i64>,
    /// At most this many rows (1 to [`MAX_PAGE`]).
    pub limit: usize,
}

impl Default for MessageFilter {
    fn default() -> Self {
        Self {
            stream: None,
            status: None,
            key: None,
            id: None,
            destination: None,
            before: None,
            limit: 50,
        }
    }
}

/// Largest page of [`StoreAdmin::messages`].
pub const MAX_PAGE: usize = 500;

impl MessageFilter {
    /// A `Config` error when the page size is out of range.
    pub fn validate(&self) -> Result<()> {
        crate::error::in_range("limit", self.limit, 1, MAX_PAGE)
    }
}

/// A parked ordering unit, as [`StoreAdmin::parked_units`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedUnit {
    /// Its stream.
    pub stream: String,
    /// Its unit within the stream.
    pub unit: String,
    /// When it was parked (by the database's clock).
    pub parked_at: SystemTime,
    /// Why: the head's last error, or the operator's reason.
    pub reason: Option<String>,
    /// Its first pending row (the one a [`StoreAdmin::skip_head`] dead-letters).
    pub head: Option<i64>,
    /// Pending rows waiting in it, counted up to [`PARKED_COUNT_CAP`].
    pub pending: u64,
}

/// `next_at` of a parked unit in the stores' unit tables: never due, so claims never read it
/// (one value for every store).
pub const PARKED_NEXT_AT: i64 = i64::MAX;

/// [`ParkedUnit::pending`] counts no further (a listing stays cheap behind a deep unit).
pub const PARKED_COUNT_CAP: u64 = 100_000;

/// Counts for one stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Stream name.
    pub stream: String,
    /// Pending rows (including leased and backing-off ones).
    pub pending: u64,
    /// Sent rows still kept.
    pub sent: u64,
    /// Dead letters.
    pub dead: u64,
    /// Creation time of the oldest pending row.
    pub oldest_pending: Option<SystemTime>,
}

/// Counts per stream, sorted by stream name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// One entry per stream with at least one row.
    pub streams: Vec<StreamStats>,
}

impl Stats {
    /// Sum over all streams.
    pub fn total(&self) -> StreamStats {
        let mut t = StreamStats {
            stream: "*".into(),
            ..Default::default()
        };
        for s in &self.streams {
            t.pending += s.pending;
            t.sent += s.sent;
            t.dead += s.dead;
            t.oldest_pending = match (t.oldest_pending, s.oldest_pending) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        t
    }
}

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

/// What [`StoreAdmin::schema`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchemaReport {
    /// Tables and indexes `migrate` makes that are not there (`table.index` where index
    /// names are per table, as on MySQL).
    pub missing: Vec<String>,
    /// Objects of an older version that `migrate` removes.
    pub legacy: Vec<String>,
    /// The schema version the table records (`<table>_schema`); `None` for a table made
    /// before versions were recorded, or without one. [`SCHEMA_VERSION`] when current.
    pub version: Option<u32>,
}

/// One numbered step of the outbox schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchemaStep {
    /// Its number: steps apply in this order, each once.
    pub version: u32,
    /// What it makes or changes.
    pub name: &'static str,
}

/// The outbox schema, step by step, oldest first. Every store's `migrate` applies the steps
/// after the version its table records in `<table>_schema`, recording each with its time, so
/// a change of the schema is a new step here and in each store, never an edit of an old one.
/// A table made before versions were recorded has none: step 1 brings any such table (every
/// shape an earlier build made) up to the first recorded version, losing no row.
pub const SCHEMA_STEPS: &[SchemaStep] = &[SchemaStep {
    version: 1,
    name: "the outbox tables, indexes and columns (brings a table made before schema versions up to date)",
}];

/// The schema version this build makes: the last of [`SCHEMA_STEPS`].
pub const SCHEMA_VERSION: u32 = SCHEMA_STEPS[SCHEMA_STEPS.len() - 1].version;

impl SchemaStep {
    /// The steps a table that records `found` still needs (`None`: none recorded), in order.
    /// A table newer than this build is an error: an older build must not run against a
    /// schema it does not know.
    pub fn after(table: &str, found: Option<u32>) -> Result<Vec<SchemaStep>> {
        let found = found.unwrap_or(0);
        if found > SCHEMA_VERSION {
            return Err(Error::new(
                crate::ErrorKind::Config,
                crate::Retry::Permanent,
                format!(
                    "table {table} has schema version {found}, newer than this build knows ({SCHEMA_VERSION}): run a newer outbox against it"
                ),
            ));
        }
        Ok(SCHEMA_STEPS
            .iter()
            .copied()
            .filter(|s| s.version > found)
            .collect())
    }
}

impl SchemaReport {
    /// Which of `expected` are missing and which of `legacy` are there, asking `exists`; and
    /// the version `table`'s versions table (`<table>_schema`, itself expected) records,
    /// asking `version` when it is there.
    pub async fn check<F, Fut, V, VFut>(
        table: &str,
        expected: &[String],
        legacy: &[String],
        exists: F,
        version: V,
    ) -> Result<Self>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = Result<bool>>,
        V: FnOnce() -> VFut,
        VFut: std::future::Future<Output = Result<Option<i64>>>,
    {
        let mut report = Self::default();
        for name in expected {
            if !exists(name.clone()).await? {
                report.missing.push(name.clone());
            }
        }
        for name in legacy {
            if exists(name.clone()).await? {
                report.legacy.push(name.clone());
            }
        }
        let versions = format!("{table}_schema");
        if exists(versions.clone()).await? {
            report.version = version().await?.map(|v| v.clamp(0, u32::MAX as i64) as u32);
        } else {
            report.missing.push(versions);
        }
        Ok(report)
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
