//! MySQL / MariaDB store: enqueue in the caller's sqlx transaction, claims by due unit (no
//! table-wide lock) with leases. MySQL has no `NOTIFY`: relays in other processes poll; relays
//! in the committing process are woken at once.
//!
//! Requires MySQL 8.0+ or MariaDB 10.6+ (InnoDB).

use outbox_core::StoreAdmin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use outbox_core::{
    to_millis, validate_identifier, AfterCommit, Claim, Enqueue, Error, Failure, NewMessage,
    Outcome, Retry, Selector, Stats, Store, StoredMessage, StreamFilter,
};
use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::{MySql, MySqlConnection, Row, Transaction};
use tokio::sync::Notify;

use crate::common::{claimed, keep_order_units, listed, redact_url, rolled_back, stats_from_rows};

pub use crate::common::map_err;
/// The sqlx this store is built with, for the application's own queries and transactions.
pub use sqlx;

/// The columns of `decode`, with the binary-collated ones converted so they read as text.
/// The columns a row is read back from; `payload` is the payload's expression (the column,
/// or one that leaves an oversized payload unread).
fn cols(payload: &str) -> String {
    format!(
        "seq, id, CONVERT(stream USING utf8mb4), destination, CONVERT(msg_key USING utf8mb4), {payload}, \
         content_type, headers, strategy, status, attempts, created_at, next_attempt_at, last_error, \
         sent_at, signature, CONVERT(okey USING utf8mb4), on_exhausted"
    )
}

/// The database clock in milliseconds.
const NOW: &str = "CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED)";

use outbox_core::PARKED_NEXT_AT as PARKED;

/// The table of applied schema steps (see [`outbox_core::SCHEMA_STEPS`]).
fn versions(t: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {t}_schema (
            version INT NOT NULL PRIMARY KEY,
            name VARCHAR(255) NOT NULL,
            applied_at BIGINT NOT NULL
        )"
    )
}

/// Records `step` as applied (once: a concurrent migrate's record stands).
fn record_version(t: &str, step: &outbox_core::SchemaStep) -> String {
    format!(
        "INSERT IGNORE INTO {t}_schema (version, name, applied_at) VALUES ({}, '{}', {NOW})",
        step.version,
        step.name.replace('\'', "''")
    )
}

mod admin;
mod claim;
mod internals;
mod settle;

/// The three tables `migrate` creates (`<table>`, `<table>_locks`, `<table>_due`), with
/// exact (binary, no-pad) collation `c` for names.
fn create_tables(t: &str, c: &str) -> [String; 3] {
    [
        format!(
            "CREATE TABLE IF NOT EXISTS {t} (
                    seq BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
                    id CHAR(36) NOT NULL,
                    stream VARCHAR(255) COLLATE {c} NOT NULL,
                    destination VARCHAR(512) NOT NULL,
                    msg_key VARCHAR(255) COLLATE {c} NULL,
                    okey VARCHAR(255) COLLATE {c} NOT NULL,
                    payload LONGBLOB NOT NULL,
                    content_type VARCHAR(255) NOT NULL,
                    headers LONGTEXT NOT NULL,
                    strategy VARCHAR(16) NOT NULL,
                    status VARCHAR(16) NOT NULL,
                    attempts INT NOT NULL DEFAULT 0,
                    created_at BIGINT NOT NULL,
                    next_attempt_at BIGINT NOT NULL,
                    locked_by VARCHAR(64) COLLATE {c} NULL,
                    locked_until BIGINT NULL,
                    last_error TEXT NULL,
                    sent_at BIGINT NULL,
                    signature VARCHAR(255) NULL,
                    on_exhausted VARCHAR(16) NULL,
                    claims INT NOT NULL DEFAULT 0,
                    UNIQUE KEY {t}_id (id),
                    KEY {t}_unit (status, stream, okey, seq),
                    KEY {t}_oc (strategy, status, next_attempt_at),
                    KEY {t}_sent (status, sent_at),
                    KEY {t}_dead (status, created_at)
                ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4"
        ),
        // Ordering-unit locks for enqueue.
        format!(
            "CREATE TABLE IF NOT EXISTS {t}_locks (
                    stream VARCHAR(255) NOT NULL,
                    okey VARCHAR(255) NOT NULL,
                    writes BIGINT NOT NULL DEFAULT 0,
                    due TINYINT NOT NULL DEFAULT 1,
                    PRIMARY KEY (stream, okey)
                ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = {c}"
        ),
        // Units as claims see them: when each may be claimed next (`next_at`: now when free,
        // the lease's end when leased, the head's retry time when backing off).
        format!(
            "CREATE TABLE IF NOT EXISTS {t}_due (
                stream VARCHAR(255) NOT NULL,
                okey VARCHAR(255) NOT NULL,
                next_at BIGINT NOT NULL,
                leased_by VARCHAR(64) NULL,
                parked_at BIGINT NULL,
                parked_reason TEXT NULL,
                claims INT NOT NULL DEFAULT 0,
                PRIMARY KEY (stream, okey),
                KEY due_next (next_at),
                KEY due_parked (parked_at)
            ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = {c}"
        ),
    ]
}

/// Settings of a [`MySqlStore`].
#[derive(Debug, Clone)]
pub struct MySqlOptions {
    /// Table name (validated, never interpolated raw; at most 57 characters so that the
    /// `<table>_locks` companion table fits). Default: `outbox`.
    pub table: String,
    /// Pool size. Default: 5.
    pub max_connections: u32,
    /// How long to wait for a pooled connection (and the first one at start-up). Default: 5 s.
    pub acquire_timeout: Duration,
    /// Longest wait for a row lock (whole seconds, at least 1): a lock held longer (a session
    /// holding a unit's row of `<table>_due` while a relay records its batch) becomes a logged,
    /// retried store error instead of a silent stall. Claims skip locked units and rows, so in
    /// practice only recording a batch's outcome can wait. Default: 5 s.
    pub lock_timeout: Duration,
}

impl Default for MySqlOptions {
    fn default() -> Self {
        Self {
            table: "outbox".into(),
            max_connections: 5,
            acquire_timeout: Duration::from_secs(5),
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
        }
    }
}

const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a store looks for keep-order rows whose unit it does not know.
const ADOPT_EVERY: Duration = Duration::from_secs(60);

/// A keep-order unit: (stream, key).
type Unit = (String, String);

/// A row a claim considers: seq, its unit (keep-order only), size, and for keep-order rows
/// when it is blocked (0: leased; else its retry time).
struct Candidate {
    seq: i64,
    unit: Option<usize>,
    size: usize,
    blocked: Option<i64>,
}

struct Inner {
    lock_timeout: Duration,
    /// When orphaned units were last looked for (see `adopt_orphans`).
    adopted: std::sync::Mutex<Option<std::time::Instant>>,
    /// Whether the server is MariaDB (else MySQL), asked once.
    mariadb: tokio::sync::OnceCell<bool>,
    pool: MySqlPool,
    /// Two connections of its own (opened on first use) that create units' lock rows
    /// outside writers' transactions (see `ensure_lock_rows`).
    side: tokio::sync::OnceCell<MySqlPool>,
    /// Units whose lock row exists (lock rows are never deleted), so a writer of a known
    /// unit needs no look-up. Cleared when it reaches `KNOWN_UNITS`.
    known: std::sync::Mutex<std::collections::HashSet<Unit>>,
    table: String,
    notify: Notify,
    /// A claim's empty units are being forgotten in the background.
    forgetting: crate::common::Background,
}

/// Most units remembered as having a lock row.
const KNOWN_UNITS: usize = 65_536;

/// The MySQL / MariaDB outbox store. Cheap to clone.
#[derive(Clone)]
pub struct MySqlStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MySqlStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MySqlStore")
            .field("table", &self.inner.table)
            .finish_non_exhaustive()
    }
}

fn list(n: usize) -> String {
    vec!["?"; n].join(", ")
}

/// `n` seqs (one parameter each) joined to `<t> o` by primary-key lookups: a statement that
/// changes rows by `seq` then touches those rows only, whatever plan `seq IN (...)` with
/// another condition would get (a scan of an index such as `<t>_oc` locks rows other relays
/// hold, and two such statements deadlock).
fn seqs_join(t: &str, n: usize) -> String {
    let rows = std::iter::once("SELECT ? AS seq")
        .chain(std::iter::repeat_n("SELECT ?", n.saturating_sub(1)))
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    format!("({rows}) x STRAIGHT_JOIN {t} o ON o.seq = x.seq")
}

/// `n` units (two parameters each, stream then key) joined to `<t>_due d` by primary-key
/// lookups. An OR-list of `(stream = ? AND okey = ?)` is no use here: MariaDB plans it as a
/// scan of the stream's units (or of the whole index) once the list is long compared with
/// the table, and an UPDATE or locking read then locks units other relays hold.
fn units_join(t: &str, n: usize) -> String {
    let rows = std::iter::once("SELECT ? AS s, ? AS k")
        .chain(std::iter::repeat_n("SELECT ?, ?", n.saturating_sub(1)))
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    format!("({rows}) x STRAIGHT_JOIN {t}_due d ON d.stream = x.s AND d.okey = x.k")
}

impl MySqlStore {
    /// Connect with the default options (table `outbox`). A malformed URL is a
    /// [`outbox_core::ErrorKind::Config`] error, an unreachable server a transient
    /// [`outbox_core::ErrorKind::Store`] error.
    ///
    /// TLS (feature `tls`, on by default): `ssl-mode` `DISABLED`, `PREFERRED` (the default),
    /// `REQUIRED`, `VERIFY_CA` (signed by `ssl-ca`, else the system's roots),
    /// `VERIFY_IDENTITY` (and the host name matches); `ssl-cert` + `ssl-key` for a client
    /// certificate. Bad modes and files are `Config` errors naming the parameter.
    pub async fn connect(url: &str) -> outbox_core::Result<Self> {
        Self::connect_with(url, MySqlOptions::default()).await
    }

    /// Connect with options.
    pub async fn connect_with(url: &str, options: MySqlOptions) -> outbox_core::Result<Self> {
        crate::common::check_tls_params(url, &crate::common::MYSQL_TLS)?;
        let connect: MySqlConnectOptions = url.parse().map_err(|e| {
            Error::config(format!("invalid MySQL URL {}", redact_url(url))).with_source(e)
        })?;
        validate_identifier(&options.table)?;
        let pool = crate::common::open_pool(
            sqlx::pool::PoolOptions::new(),
            connect,
            options.max_connections,
            options.acquire_timeout,
            url,
            "MySQL",
        )
        .await?;
        let mut store = Self::from_pool(pool, &options.table)?;
        if let Some(inner) = Arc::get_mut(&mut store.inner) {
            inner.lock_timeout = options.lock_timeout;
        }
        Ok(store)
    }

    /// Use an existing pool.
    pub fn from_pool(pool: MySqlPool, table: &str) -> outbox_core::Result<Self> {
        validate_identifier(table)?;
        if table.len() > 57 {
            return Err(Error::new(
                outbox_core::ErrorKind::InvalidIdentifier,
                Retry::Permanent,
                format!("MySQL table name {table:?} is over 57 characters"),
            ));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                lock_timeout: DEFAULT_LOCK_TIMEOUT,
                adopted: std::sync::Mutex::new(None),
                mariadb: tokio::sync::OnceCell::new(),
                pool,
                side: tokio::sync::OnceCell::new(),
                known: Default::default(),
                table: table.to_owned(),
                notify: Notify::new(),
                forgetting: Default::default(),
            }),
        })
    }

    /// The pool.
    pub fn pool(&self) -> &MySqlPool {
        &self.inner.pool
    }

    /// The table name.
    pub fn table(&self) -> &str {
        &self.inner.table
    }

    /// Whether the outbox table exists in the current database.
    pub async fn table_exists(&self) -> outbox_core::Result<bool> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name = ?",
        )
        .bind(&self.inner.table)
        .fetch_one(&self.inner.pool)
        .await
        .map_err(map_err)?;
        Ok(n > 0)
    }

    /// A second store on the same table with its own pool (as another process would have).
    pub async fn reopen(&self) -> outbox_core::Result<Self> {
        let options = self.inner.pool.connect_options().as_ref().clone();
        let pool = MySqlPoolOptions::new()
            .max_connections(5)
            .connect_with(options)
            .await
            .map_err(map_err)?;
        Self::from_pool(pool, &self.inner.table)
    }
}

/// Rows are written in the caller's transaction, in one `INSERT`; either all are written or,
/// on error, none. Keep-order rows lock their ordering unit (a row of `<table>_locks`) until
/// the transaction ends. Only a transaction is accepted: in autocommit the unit lock would
/// end with the statement, and two writers of a unit could commit out of `seq` order.
#[async_trait]
impl<'c> Enqueue<Transaction<'c, MySql>> for MySqlStore {
    async fn write_rows(
        &self,
        tx: &mut Transaction<'c, MySql>,
        rows: &[NewMessage],
        need_seqs: bool,
    ) -> outbox_core::Result<Vec<i64>> {
        let conn: &mut MySqlConnection = tx;
        let t = &self.inner.table;
        let units = keep_order_units(rows);
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        self.ensure_lock_rows(&units).await?;
        // One keep-order row of a unit the claims know: lock it and insert in one round trip
        // (its lock row exists and is never deleted, so this locks no gap); nothing is
        // inserted when the unit is forgotten (`due = 0`), and the upsert below handles it.
        if let ([_], [unit]) = (rows, units.as_slice()) {
            if insert_only(&mut *conn, t, rows, Some(unit))
                .await?
                .rows_affected()
                == 1
            {
                return Ok(vec![0]);
            }
        }
        lock_units(&mut *conn, t, &units).await?;
        if need_seqs {
            insert(&mut *conn, t, rows).await
        } else {
            insert_only(&mut *conn, t, rows, None).await?;
            Ok(vec![0; rows.len()])
        }
    }

    fn transaction_depth(&self, tx: &Transaction<'c, MySql>) -> usize {
        depth(tx)
    }
}

/// Take the writer locks of keep-order units (sorted: writers never deadlock on them), rows
/// of `<table>_locks` held until the transaction ends. A unit the claims do not know (new,
/// or forgotten once it was empty: its lock row says `due = 0`) also gets its row of
/// `<table>_due`, which claims pick units from. Both are changed only under this lock, so a
/// writer that finds `due = 1` knows the claims know the unit, and never touches (or waits
/// for) the row claims lock.
///
/// The lock is one upsert of a row that exists (`MySqlStore::ensure_lock_rows` made it),
/// never a locking read, and lock rows are never deleted: in the caller's (REPEATABLE READ)
/// transaction a locking read of a missing row, and a duplicate check that meets a deleted
/// row not yet purged, lock the gap before the next row, and two writers of new units in
/// that gap deadlock when each inserts its own. The upsert bumps `writes` (so it reports 2
/// rows even under sqlx's `CLIENT_FOUND_ROWS`, where an upsert that changes nothing reports
/// 1, as an insert does) and hands back the unit's previous `due` through
/// `LAST_INSERT_ID(expr)` (the documented way to return a value from the update branch of
/// an upsert). Should the row be missing after all, the upsert inserts it (1 row): a new
/// unit too.
async fn lock_units(
    conn: &mut MySqlConnection,
    t: &str,
    units: &[(String, String)],
) -> outbox_core::Result<()> {
    for (stream, key) in units {
        let locked = sqlx::query(&format!(
            "INSERT INTO {t}_locks (stream, okey) VALUES (?, ?)
             ON DUPLICATE KEY UPDATE writes = writes + 1, due = LAST_INSERT_ID(due) * 0 + 1"
        ))
        .bind(stream)
        .bind(key)
        .execute(&mut *conn)
        .await
        .map_err(map_err)?;
        let known = locked.rows_affected() == 2 && locked.last_insert_id() == 1;
        if !known {
            sqlx::query(&format!(
                "INSERT IGNORE INTO {t}_due (stream, okey, next_at) VALUES (?, ?, {NOW})"
            ))
            .bind(stream)
            .bind(key)
            .execute(&mut *conn)
            .await
            .map_err(map_err)?;
        }
    }
    Ok(())
}

/// How deeply `tx` is nested (1: the outermost transaction; more: a savepoint).
fn depth(tx: &Transaction<'_, MySql>) -> usize {
    use sqlx::TransactionManager;
    let conn: &MySqlConnection = tx;
    <MySql as sqlx::Database>::TransactionManager::get_transaction_depth(conn)
}

/// Commit `tx`, then publish its publish-on-commit messages in the background.
///
/// A savepoint (a nested transaction) with something to publish is refused with an
/// [`outbox_core::ErrorKind::Savepoint`] error and rolled back (it is dropped): releasing it
/// would commit nothing, and publishing then could announce what its parent rolls back.
/// [`Outbox::enqueue`](outbox_core::Outbox::enqueue) already refuses such messages in a
/// savepoint; this catches a handle carried into one.
pub async fn commit(tx: Transaction<'_, MySql>, after: AfterCommit) -> outbox_core::Result<()> {
    let depth = depth(&tx);
    if depth > 1 && !after.is_empty() {
        return Err(Error::savepoint(depth));
    }
    tx.commit().await.map_err(map_err)?;
    after.dispatch();
    Ok(())
}

/// One multi-row INSERT. With `unit` (one keep-order row): `INSERT ... SELECT ... FROM
/// <table>_locks ... FOR UPDATE`, which takes the unit's writer lock and inserts in one round
/// trip, and inserts nothing unless the unit is known to claims (`due = 1`).
async fn insert_only(
    conn: &mut MySqlConnection,
    t: &str,
    rows: &[NewMessage],
    unit: Option<&(String, String)>,
) -> outbox_core::Result<sqlx::mysql::MySqlQueryResult> {
    let values = format!(
        "?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, GREATEST({NOW} + GREATEST(?, IFNULL(?, 0)), IFNULL(?, 0)), ?, \
         IF(? IS NULL, NULL, {NOW} + ?), ?, ?, ?"
    );
    let columns = format!(
        "INSERT INTO {t} (id, stream, destination, msg_key, okey, payload, content_type, headers, strategy, \
           status, attempts, created_at, next_attempt_at, locked_by, locked_until, last_error, signature, \
           on_exhausted)"
    );
    let sql = match unit {
        Some(_) => format!(
            "{columns} SELECT {values} FROM {t}_locks WHERE stream = ? AND okey = ? AND due = 1 FOR UPDATE"
        ),
        None => format!(
            "{columns} VALUES {}",
            vec![format!("({values})"); rows.len()].join(", ")
        ),
    };
    let mut q = sqlx::query(&sql);
    for r in rows {
        let m = &r.envelope.message;
        let lease = r.lease.as_ref().map(|(_, d)| d.as_millis() as i64);
        q = q
            .bind(r.envelope.id.to_string())
            .bind(&m.stream)
            .bind(&m.destination)
            .bind(&m.key)
            .bind(&r.unit)
            .bind(&m.payload)
            .bind(&m.content_type)
            .bind(serde_json::to_string(&m.headers)?)
            .bind(r.order.as_str())
            .bind(r.status.as_str())
            .bind(r.attempts as i32)
            .bind(to_millis(r.envelope.created_at))
            .bind(r.retry_after.as_millis() as i64)
            .bind(lease)
            .bind(r.not_before.map(to_millis))
            .bind(r.lease.as_ref().map(|(o, _)| o.clone()))
            .bind(lease)
            .bind(lease)
            .bind(&r.last_error)
            .bind(&r.signature)
            .bind(r.exhausted.as_stored());
    }
    if let Some((stream, key)) = unit {
        q = q.bind(stream).bind(key);
    }
    q.execute(&mut *conn).await.map_err(map_err)
}

/// Insert and read the `seq`s back (by id: a multi-row insert's ids need not be contiguous).
async fn insert(
    conn: &mut MySqlConnection,
    t: &str,
    rows: &[NewMessage],
) -> outbox_core::Result<Vec<i64>> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let done = insert_only(&mut *conn, t, rows, None).await?;
    if rows.len() == 1 {
        return Ok(vec![done.last_insert_id() as i64]);
    }
    let ids: Vec<String> = rows.iter().map(|r| r.envelope.id.to_string()).collect();
    let sql = format!("SELECT seq, id FROM {t} WHERE id IN ({})", list(ids.len()));
    let mut q = sqlx::query_as::<_, (i64, String)>(&sql);
    for id in &ids {
        q = q.bind(id);
    }
    let by_id: std::collections::HashMap<String, i64> = q
        .fetch_all(&mut *conn)
        .await
        .map_err(map_err)?
        .into_iter()
        .map(|(s, id)| (id, s))
        .collect();
    ids.iter()
        .map(|id| {
            by_id
                .get(id)
                .copied()
                .ok_or_else(|| Error::store("insert did not return every row"))
        })
        .collect()
}

fn selector(sel: &Selector) -> (String, Vec<sqlx_value::V>) {
    match sel {
        Selector::All => (String::new(), vec![]),
        Selector::Stream(s) => (" AND stream = ?".into(), vec![sqlx_value::V::S(s.clone())]),
        Selector::Seqs(seqs) if seqs.is_empty() => (" AND 1 = 0".into(), vec![]),
        Selector::Seqs(seqs) => (
            format!(" AND seq IN ({})", list(seqs.len())),
            seqs.iter().map(|s| sqlx_value::V::I(*s)).collect(),
        ),
    }
}

mod sqlx_value {
    /// A bind value for dynamically built statements.
    pub enum V {
        S(String),
        I(i64),
    }

    pub fn bind<'q>(
        mut q: sqlx::query::Query<'q, sqlx::MySql, sqlx::mysql::MySqlArguments>,
        vals: &'q [V],
    ) -> sqlx::query::Query<'q, sqlx::MySql, sqlx::mysql::MySqlArguments> {
        for v in vals {
            q = match v {
                V::S(s) => q.bind(s),
                V::I(i) => q.bind(i),
            };
        }
        q
    }
}

#[async_trait]
impl Store for MySqlStore {
    fn signing_scope(&self) -> String {
        self.inner.table.clone()
    }

    async fn migrate(&self) -> outbox_core::Result<()> {
        let t = &self.inner.table;
        sqlx::query(&versions(t))
            .execute(&self.inner.pool)
            .await
            .map_err(map_err)?;
        let found: Option<i32> =
            sqlx::query_scalar(&format!("SELECT max(version) FROM {t}_schema"))
                .fetch_one(&self.inner.pool)
                .await
                .map_err(map_err)?;
        // A table dropped since (by hand): every step again, or the recorded version would
        // leave it missing.
        let found = match self.table_exists().await? {
            true => found,
            false => None,
        };
        // MySQL commits each DDL statement: every step is idempotent, so a migrate cut short
        // (or two at once) is finished by the next.
        for step in outbox_core::SchemaStep::after(t, found.map(|v| v.max(0) as u32))? {
            match step.version {
                1 => self.step_one().await?,
                v => {
                    return Err(Error::config(format!(
                        "schema step {v} has no MySQL statements in this build"
                    )))
                }
            }
            sqlx::query(&record_version(t, &step))
                .execute(&self.inner.pool)
                .await
                .map_err(map_err)?;
            tracing::info!(table = %t, version = step.version, step = step.name, "schema step applied");
        }
        Ok(())
    }

    async fn insert(&self, rows: &[NewMessage]) -> outbox_core::Result<Vec<i64>> {
        let units = keep_order_units(rows);
        self.ensure_lock_rows(&units).await?;
        let mut tx = self.inner.pool.begin().await.map_err(map_err)?;
        lock_units(&mut tx, &self.inner.table, &units).await?;
        let seqs = insert(&mut tx, &self.inner.table, rows).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(seqs)
    }

    async fn claim(&self, claim: &Claim) -> outbox_core::Result<Vec<outbox_core::Claimed>> {
        self.adopt_orphans(false).await?;
        // Empty units are forgotten between two claims; a claim that found only those looks
        // again, so it never reports "nothing to do" while units wait.
        for _ in 0..3 {
            let (rows, empty) = self.claim_once(claim).await?;
            let retry = rows.is_empty() && !empty.is_empty();
            if retry {
                self.forget_empty_units(&empty).await?;
            } else if !empty.is_empty() {
                // Off the path to publishing: a unit left unforgotten is found again.
                let store = self.clone();
                self.inner
                    .forgetting
                    .run(async move { store.forget_empty_units(&empty).await });
            }
            if !retry {
                return Ok(rows);
            }
        }
        Ok(Vec::new())
    }

    /// Publish-on-commit rows (the committing process's path) in one autocommit statement;
    /// the batch path (a transaction that also settles units) takes five round trips. When
    /// some rows are not publish-on-commit ones, the batch path settles them all (marking a
    /// row sent twice changes nothing).
    async fn complete(&self, seqs: &[i64], delete: bool) -> outbox_core::Result<()> {
        if seqs.is_empty() {
            return Ok(());
        }
        if seqs.len() <= 1000 {
            let t = &self.inner.table;
            let sql = if delete {
                format!(
                    "DELETE o FROM {} WHERE o.strategy = 'on_commit'",
                    seqs_join(t, seqs.len())
                )
            } else {
                format!(
                    "UPDATE {} SET o.status = 'sent', o.sent_at = {NOW}, o.locked_by = NULL, o.locked_until = NULL
                     WHERE o.strategy = 'on_commit'",
                    seqs_join(t, seqs.len())
                )
            };
            let mut q = sqlx::query(&sql);
            for s in seqs {
                q = q.bind(s);
            }
            let done = q
                .execute(&self.inner.pool)
                .await
                .map_err(map_err)?
                .rows_affected();
            if done == seqs.len() as u64 {
                return Ok(());
            }
        }
        self.settle_rows(None, seqs, delete, &[]).await
    }

    async fn fail(&self, owner: &str, failures: &[Failure]) -> outbox_core::Result<()> {
        self.settle_rows(Some(owner), &[], false, failures).await
    }

    async fn settle(
        &self,
        owner: &str,
        done: &[i64],
        delete: bool,
        failures: &[Failure],
    ) -> outbox_core::Result<()> {
        self.settle_rows(Some(owner), done, delete, failures).await
    }

    async fn park_unit(&self, stream: &str, unit: &str, reason: &str) -> outbox_core::Result<()> {
        let t = &self.inner.table;
        let mut tx = self.inner.pool.begin().await.map_err(map_err)?;
        let pending: Option<i64> = sqlx::query_scalar(&format!(
            "SELECT seq FROM {t} WHERE status = 'pending' AND stream = ? AND okey = ?
               AND strategy <> 'on_commit' LIMIT 1"
        ))
        .bind(stream)
        .bind(unit)
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_err)?;
        if pending.is_some() {
            // Under the unit's writer lock, which also adopts a unit the claims do not know
            // yet (rows written by SQL).
            lock_units(&mut tx, t, &[(stream.to_owned(), unit.to_owned())]).await?;
            sqlx::query(&format!(
                "UPDATE {t}_due SET parked_at = {NOW}, parked_reason = ?, next_at = {PARKED}
                 WHERE stream = ? AND okey = ? AND parked_at IS NULL"
            ))
            .bind(reason)
            .bind(stream)
            .bind(unit)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        } else {
            let parked: Option<i64> = sqlx::query_scalar(&format!(
                "SELECT 1 FROM {t}_due WHERE stream = ? AND okey = ? AND parked_at IS NOT NULL"
            ))
            .bind(stream)
            .bind(unit)
            .fetch_optional(&mut *tx)
            .await
            .map_err(map_err)?;
            if parked.is_none() {
                return Err(rolled_back(tx, outbox_core::no_such_unit(stream, unit, false)).await);
            }
        }
        tx.commit().await.map_err(map_err)
    }

    async fn wait_for_work(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.inner.notify.notified()).await;
    }

    fn notify_committed(&self) {
        self.inner.notify.notify_one();
    }
}
