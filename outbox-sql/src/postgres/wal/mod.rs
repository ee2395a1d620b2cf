//! The WAL relay: PostgreSQL's write-ahead log as the outbox (feature `pg-wal`).
//!
//! A polling relay claims rows with SQL, publishes, and settles with more SQL; every write
//! pays a unit lock and a NOTIFY. Here the writer pays neither: [`WalStore`]'s `enqueue`
//! calls `pg_logical_emit_message(true, prefix, …)` inside the business transaction (no row,
//! no index, no vacuum), and a [`WalRelay`] receives those messages over a logical
//! replication slot (`pgoutput`) when the transaction commits, in commit order.
//! [`commit_with`] sends the messages in the `COMMIT`'s round trip instead, so the writer
//! pays no round trip of its own.
//!
//! # Delivery contract
//! - **Atomic enqueue.** A transactional logical message is decoded only if its transaction
//!   (and its savepoint) commits: a rollback publishes nothing.
//! - **At-least-once.** The relay confirms the slot's position (`confirmed_flush_lsn`) only
//!   up to the last transaction whose every message the broker acknowledged or that was
//!   durably written aside to the table. A relay that dies re-reads from there: at most the
//!   unconfirmed window is published again, nothing is skipped.
//! - **Order.** WAL order is commit order. A unit's next message is published only after the
//!   previous one was acknowledged (or, for a publisher that keeps a batch's order, in one
//!   ordered run), so no lock is taken on write.
//! - **Failures.** A refused message is retried in memory with backoff for
//!   [`memory_attempts`](WalRelayBuilder::memory_attempts); other units keep flowing. Then
//!   the table's rules apply: the message is written to the [`PgStore`] table (dead-lettered,
//!   or pending with its attempts and error), its unit is *diverted* (its later messages are
//!   written behind it, in order, and parked with it if its policy parks), and the polling
//!   relay inside the WAL relay publishes the table's rows by the usual rules (retries,
//!   stuck reports, park and resume, requeue from the console). When the unit has nothing
//!   pending in the table any more, its messages flow from the WAL again.
//! - **Crashes.** Killed while a batch is at the broker: that batch and everything after the
//!   confirmed position is read again and published again (duplicates, first deliveries in
//!   order). Killed after writing messages aside but before confirming: they are read again,
//!   their unit is diverted (it has pending rows), so they are written aside again behind the
//!   first copies (duplicates in the table, published in order). PostgreSQL restarted: the
//!   relay reconnects and resumes from the slot.
//! - **One reader.** A slot streams to one session at a time: a second relay waits as a
//!   standby, retrying every `standby_interval`, and takes over when the first one's session
//!   ends.
//!
//! Requirements: `wal_level = logical`, a role with `REPLICATION` (or superuser) for the
//! relay, and the slot and publication ([`WalStore::setup`], or [`setup_sql`] for a DBA).
//! An abandoned slot keeps WAL on the server's disk: [`slot_lag`] says how much, and the
//! relay warns past [`WalRelayBuilder::max_retained_bytes`].

mod pgoutput;
mod record;
mod relay;

pub use relay::{WalRelay, WalRelayBuilder, WalStats};

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use outbox_core::{
    Claim, Claimed, Enqueue, Error, ErrorKind, Failure, Message, MessageFilter, NewMessage, Outbox,
    ParkedUnit, PublishedBy, Result, Retry, SchemaReport, Selector, Stats, Store, StoreAdmin,
    StoredMessage,
};
use sqlx::{Postgres, Transaction};

use super::{map_err, PgStore};
use crate::common::push_hex;

/// Rows per logical message: about this many bytes.
const CHUNK_BYTES: usize = 4 << 20;

/// The default logical-message prefix.
pub const DEFAULT_PREFIX: &str = "outbox";

/// A PostgreSQL outbox with no table rows on write: `enqueue` emits one transactional
/// logical message per call (`pg_logical_emit_message`), which a [`WalRelay`] publishes.
///
/// Everything else (dead letters, diverted units, the admin commands and the console) is the
/// wrapped [`PgStore`]'s table, which this type forwards to.
///
/// Every message is published by the relay: an [`Outbox`](outbox_core::Outbox) over a
/// `WalStore` is built with [`Outbox::writer`](outbox_core::Outbox::writer), and a
/// publish-on-commit strategy is refused at enqueue (the WAL relay is the fast path).
#[derive(Clone)]
pub struct WalStore {
    table: PgStore,
    prefix: Arc<str>,
    rows: bool,
}

impl std::fmt::Debug for WalStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalStore")
            .field("table", &self.table.table())
            .field("prefix", &self.prefix)
            .field("rows", &self.rows)
            .finish()
    }
}

impl WalStore {
    /// Over `table` (its pool writes the messages; its table takes dead letters and diverted
    /// units), with the logical-message prefix `prefix` (letters, digits, `_`, `.`, `-`; at
    /// most 64). Relays read only their prefix's messages.
    pub fn new(table: PgStore, prefix: &str) -> Result<Self> {
        let ok = !prefix.is_empty()
            && prefix.len() <= 64
            && prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !ok {
            return Err(Error::new(
                ErrorKind::InvalidIdentifier,
                Retry::Permanent,
                format!(
                    "WAL message prefix {:?} must be 1 to 64 letters, digits, '_', '.' or '-'",
                    prefix.chars().take(80).collect::<String>()
                ),
            ));
        }
        Ok(Self {
            table,
            prefix: prefix.into(),
            rows: false,
        })
    }

    /// Table mode: each `enqueue` inserts one row into `<table>_wal` (an append-only table
    /// the publication lists: no unit lock, no NOTIFY, no index but its key) instead of
    /// emitting a logical message. The relay decodes the rows' inserts from the WAL and
    /// deletes the rows once the slot's position is confirmed past them. Messages stay
    /// visible in SQL until they are published; the writer needs `INSERT` on one table and
    /// nothing else.
    pub fn rows(table: PgStore) -> Self {
        Self {
            table,
            prefix: DEFAULT_PREFIX.into(),
            rows: true,
        }
    }

    /// Whether this store writes rows (table mode) or logical messages.
    pub fn writes_rows(&self) -> bool {
        self.rows
    }

    /// The append-only table of table mode, `<table>_wal`.
    pub fn wal_table(&self) -> String {
        format!("{}_wal", self.table.table())
    }

    /// The table store.
    pub fn table(&self) -> &PgStore {
        &self.table
    }

    /// The logical-message prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Create the table (as `migrate`), the publication and the logical replication slot if
    /// they do not exist. Needs `wal_level = logical` and a role with `REPLICATION` (the slot)
    /// and `CREATE` on the database (the publication).
    pub async fn setup(&self, slot: &str, publication: &str) -> Result<()> {
        Store::migrate(&self.table).await?;
        check_wal_level(self.table.pool()).await?;
        let rows = self.rows.then(|| self.table.table());
        for statement in setup_sql_for(slot, publication, rows)? {
            sqlx::query(&statement)
                .execute(self.table.pool())
                .await
                .map_err(|e| {
                    let e = map_err(e);
                    Error::new(e.kind(), e.retry(), format!("WAL setup `{statement}`: {e}"))
                })?;
        }
        Ok(())
    }
}

/// The statements [`WalStore::setup`] runs after the table's migration, for a DBA to review
/// (idempotent). The publication lists no table: table-less messages need none, and
/// `pgoutput` asks for one by name.
pub fn setup_sql(slot: &str, publication: &str) -> Result<Vec<String>> {
    setup_sql_for(slot, publication, None)
}

/// [`setup_sql`] for table mode ([`WalStore::rows`]) over `table`: the append-only
/// `<table>_wal` and a publication of its inserts.
pub fn setup_sql_rows(slot: &str, publication: &str, table: &str) -> Result<Vec<String>> {
    setup_sql_for(slot, publication, Some(table))
}

fn setup_sql_for(slot: &str, publication: &str, rows: Option<&str>) -> Result<Vec<String>> {
    outbox_core::validate_identifier(slot)?;
    outbox_core::validate_identifier(publication)?;
    let mut out = Vec::new();
    let listed = match rows {
        None => String::new(),
        Some(t) => {
            outbox_core::validate_identifier(t)?;
            out.push(format!(
                "CREATE TABLE IF NOT EXISTS {t}_wal (seq BIGSERIAL PRIMARY KEY, batch BYTEA NOT NULL)"
            ));
            format!(" FOR TABLE {t}_wal WITH (publish = 'insert')")
        }
    };
    out.extend([
        format!(
            "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = '{publication}') \
             THEN CREATE PUBLICATION {publication}{listed}; END IF; END $$"
        ),
        format!(
            "SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput') \
             WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = '{slot}')"
        ),
    ]);
    Ok(out)
}

/// `wal_level` must be `logical` for a logical slot: say so plainly, before the server's
/// own error.
async fn check_wal_level(pool: &sqlx::PgPool) -> Result<()> {
    let level: String = sqlx::query_scalar("SELECT current_setting('wal_level')")
        .fetch_one(pool)
        .await
        .map_err(map_err)?;
    if level != "logical" {
        return Err(Error::config(format!(
            "the WAL relay needs wal_level = logical (the server has {level}); set it in postgresql.conf and restart"
        )));
    }
    Ok(())
}

/// How far a slot is behind: the WAL it keeps on the server's disk, in bytes, whether a
/// session is reading it now and, while one is, its lag in time as the server measures it.
/// `None` when the slot does not exist.
pub async fn slot_lag(pool: &sqlx::PgPool, slot: &str) -> Result<Option<SlotLag>> {
    let row: Option<(Option<i64>, bool, Option<i64>)> = sqlx::query_as(
        "SELECT (pg_current_wal_lsn() - s.confirmed_flush_lsn)::int8, s.active, \
                (EXTRACT(EPOCH FROM r.flush_lag) * 1000000)::int8 \
         FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid \
         WHERE s.slot_name = $1",
    )
    .bind(slot)
    .fetch_optional(pool)
    .await
    .map_err(map_err)?;
    Ok(row.map(|(bytes, active, micros)| SlotLag {
        retained_bytes: bytes.unwrap_or(0).max(0) as u64,
        active,
        lag: micros.map(|us| Duration::from_micros(us.max(0) as u64)),
    }))
}

/// What `outbox doctor` checks of a WAL relay's set-up: [`health`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalHealth {
    /// The server's `wal_level` (`logical` is needed).
    pub wal_level: String,
    /// Whether the publication exists.
    pub publication: bool,
    /// The tables the publication publishes (table mode's `<table>_wal`; none without rows).
    pub published_tables: Vec<String>,
    /// The slot's plugin (`pgoutput` is needed) and lag, when it exists.
    pub slot: Option<(String, SlotLag)>,
}

/// The server's `wal_level`, the publication, the slot and its lag.
pub async fn health(pool: &sqlx::PgPool, slot: &str, publication: &str) -> Result<WalHealth> {
    let publication_name = publication;
    let wal_level: String = sqlx::query_scalar("SELECT current_setting('wal_level')")
        .fetch_one(pool)
        .await
        .map_err(map_err)?;
    let publication: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)")
            .bind(publication)
            .fetch_one(pool)
            .await
            .map_err(map_err)?;
    let published_tables: Vec<String> = sqlx::query_scalar(
        "SELECT tablename::text FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1",
    )
    .bind(publication_name)
    .fetch_all(pool)
    .await
    .map_err(map_err)?;
    let plugin: Option<Option<String>> =
        sqlx::query_scalar("SELECT plugin::text FROM pg_replication_slots WHERE slot_name = $1")
            .bind(slot)
            .fetch_optional(pool)
            .await
            .map_err(map_err)?;
    let lag = slot_lag(pool, slot).await?;
    Ok(WalHealth {
        wal_level,
        publication,
        published_tables,
        slot: plugin.zip(lag).map(|(p, l)| (p.unwrap_or_default(), l)),
    })
}

/// See [`slot_lag`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotLag {
    /// WAL between the slot's confirmed position and the server's current one.
    pub retained_bytes: u64,
    /// Whether a relay is streaming from the slot now.
    pub active: bool,
    /// The server's measure of the reading relay's lag: from WAL being written to the relay
    /// confirming it, which it does once the broker has everything up to it
    /// (`pg_stat_replication.flush_lag`, at the relay's status interval). `None` with no relay
    /// reading, shortly after it has caught up with an idle server, or for a role that may
    /// not see other sessions' statistics (`pg_read_all_stats`).
    pub lag: Option<Duration>,
}

/// `rows` as logical messages of about [`CHUNK_BYTES`] each, in order: a reader never has to
/// hold one enormous message, and a transaction of any size still decodes.
fn batches(rows: &[NewMessage]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < rows.len() {
        let mut end = start;
        let mut size = 0;
        while end < rows.len() && (end == start || size < CHUNK_BYTES) {
            size += 256 + rows[end].envelope.message.payload.len();
            end += 1;
        }
        out.push(record::encode(&rows[start..end]));
        start = end;
    }
    out
}

/// Write `messages` with `writer` and commit `tx`, in the round trip of the `COMMIT`: the
/// writer's cost per transaction is then the message's work on the server and no round trip
/// of its own (`enqueue` then `commit` costs one statement more than the transaction alone).
///
/// The messages and the `COMMIT` travel as one simple query, so the messages are written into
/// its text (hex; the prefix and table name are validated identifiers), then `BEGIN` opens an
/// empty transaction that `tx`, dropped here, rolls back when its connection is next used (a
/// pooled connection: on its way back to the pool, off the caller's path). Either the
/// messages and the transaction's own writes commit together or, on any error, neither does.
///
/// `tx` must be the outermost transaction: in a savepoint, `COMMIT` would commit its parent,
/// so that is refused with an [`ErrorKind::Savepoint`] error and nothing is written. Messages
/// the writer refuses (validation, size) are refused before anything is sent.
pub async fn commit_with(
    mut tx: Transaction<'_, Postgres>,
    writer: &Outbox<WalStore>,
    messages: impl IntoIterator<Item = Message>,
) -> Result<()> {
    let store = writer.store();
    let depth = <WalStore as Enqueue<Transaction<'_, Postgres>>>::transaction_depth(store, &tx);
    if depth > 1 {
        return Err(Error::savepoint(depth));
    }
    let prepared = writer.prepare(messages)?;
    if prepared.publishes_after_commit() {
        return Err(Error::config(
            "a WalStore's messages are published by the WAL relay: build the outbox with Outbox::writer(store) (no publish-on-commit)",
        ));
    }
    let mut sql = String::new();
    for batch in batches(prepared.rows()) {
        if store.rows {
            sql.push_str(&format!(
                "INSERT INTO {}_wal (batch) VALUES (decode('",
                store.table.table()
            ));
            push_hex(&mut sql, &batch);
            sql.push_str("', 'hex'));");
        } else {
            sql.push_str(&format!(
                "SELECT pg_logical_emit_message(true, '{}', decode('",
                store.prefix
            ));
            push_hex(&mut sql, &batch);
            sql.push_str("', 'hex'));");
        }
    }
    sql.push_str("COMMIT; BEGIN");
    // An error stops the query where it happened: the transaction is rolled back (by the
    // failed COMMIT, or by `tx` on drop when an earlier statement failed).
    // A `&str` without arguments goes as a simple query (several statements in one);
    // `raw_sql` would do the same but makes this future not `Send` for every lifetime.
    sqlx::Executor::execute(&mut *tx, sql.as_str())
        .await
        .map_err(map_err)?;
    Ok(())
}

#[async_trait]
impl<'c> Enqueue<Transaction<'c, Postgres>> for WalStore {
    async fn write_rows(
        &self,
        tx: &mut Transaction<'c, Postgres>,
        rows: &[NewMessage],
        _need_seqs: bool,
    ) -> Result<Vec<i64>> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        if rows
            .iter()
            .any(|r| r.published_by == PublishedBy::Committer)
        {
            return Err(Error::config(
                "a WalStore's messages are published by the WAL relay: build the outbox with Outbox::writer(store) (no publish-on-commit)",
            ));
        }
        for batch in batches(rows) {
            if self.rows {
                sqlx::query(&format!(
                    "INSERT INTO {}_wal (batch) VALUES ($1)",
                    self.table.table()
                ))
                .bind(batch)
                .execute(&mut **tx)
                .await
                .map_err(map_err)?;
            } else {
                sqlx::query("SELECT pg_logical_emit_message(true, $1, $2)")
                    .bind(&*self.prefix)
                    .bind(batch)
                    .execute(&mut **tx)
                    .await
                    .map_err(map_err)?;
            }
        }
        Ok(vec![0; rows.len()])
    }

    fn transaction_depth(&self, tx: &Transaction<'c, Postgres>) -> usize {
        <PgStore as Enqueue<Transaction<'c, Postgres>>>::transaction_depth(&self.table, tx)
    }
}

#[async_trait]
impl Store for WalStore {
    async fn migrate(&self) -> Result<()> {
        self.table.migrate().await
    }
    async fn insert(&self, rows: &[NewMessage]) -> Result<Vec<i64>> {
        self.table.insert(rows).await
    }
    async fn claim(&self, claim: &Claim) -> Result<Vec<Claimed>> {
        self.table.claim(claim).await
    }
    async fn complete(&self, seqs: &[i64], delete: bool) -> Result<()> {
        self.table.complete(seqs, delete).await
    }
    async fn fail(&self, owner: &str, failures: &[Failure]) -> Result<()> {
        self.table.fail(owner, failures).await
    }
    async fn settle(
        &self,
        owner: &str,
        done: &[i64],
        delete: bool,
        failures: &[Failure],
    ) -> Result<()> {
        self.table.settle(owner, done, delete, failures).await
    }
    async fn park_unit(&self, stream: &str, unit: &str, reason: &str) -> Result<()> {
        self.table.park_unit(stream, unit, reason).await
    }
    async fn wait_for_work(&self, timeout: Duration) {
        self.table.wait_for_work(timeout).await
    }
    async fn start_listening(&self) -> Result<()> {
        self.table.start_listening().await
    }
    fn notify_committed(&self) {
        self.table.notify_committed()
    }
    fn signing_scope(&self) -> String {
        self.table.signing_scope()
    }
}

#[async_trait]
impl StoreAdmin for WalStore {
    async fn schema(&self) -> Result<SchemaReport> {
        self.table.schema().await
    }
    async fn stats(&self) -> Result<Stats> {
        self.table.stats().await
    }
    async fn get(&self, seq: i64) -> Result<Option<StoredMessage>> {
        self.table.get(seq).await
    }
    async fn messages(&self, filter: &MessageFilter) -> Result<Vec<StoredMessage>> {
        self.table.messages(filter).await
    }
    async fn dead_letters(&self, stream: Option<&str>, limit: usize) -> Result<Vec<StoredMessage>> {
        self.table.dead_letters(stream, limit).await
    }
    async fn requeue(&self, selector: &Selector) -> Result<u64> {
        self.table.requeue(selector).await
    }
    async fn purge_dead(&self, selector: &Selector) -> Result<u64> {
        self.table.purge_dead(selector).await
    }
    async fn parked_units(&self, stream: Option<&str>, limit: usize) -> Result<Vec<ParkedUnit>> {
        self.table.parked_units(stream, limit).await
    }
    async fn resume_unit(&self, stream: &str, unit: &str) -> Result<()> {
        self.table.resume_unit(stream, unit).await
    }
    async fn skip_head(&self, stream: &str, unit: &str) -> Result<Option<i64>> {
        self.table.skip_head(stream, unit).await
    }
    async fn clean(
        &self,
        sent_before: SystemTime,
        limit: usize,
        include_dead: bool,
    ) -> Result<u64> {
        self.table.clean(sent_before, limit, include_dead).await
    }
}
