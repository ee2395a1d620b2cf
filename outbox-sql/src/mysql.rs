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
const COLS: &str = "seq, id, CONVERT(stream USING utf8mb4), destination, CONVERT(msg_key USING utf8mb4), payload, \
                    content_type, headers, strategy, status, attempts, created_at, next_attempt_at, last_error, \
                    sent_at, signature, CONVERT(okey USING utf8mb4), on_exhausted";

/// The database clock in milliseconds.
const NOW: &str = "CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED)";

use outbox_core::PARKED_NEXT_AT as PARKED;

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
        crate::common::probe::<sqlx::MySqlConnection>(
            &connect,
            options.acquire_timeout,
            url,
            "MySQL",
        )
        .await?;
        let pool = MySqlPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect)
            .await
            .map_err(|e| {
                let mapped = map_err(e);
                Error::new(
                    mapped.kind(),
                    Retry::Transient,
                    format!("cannot connect to MySQL at {}", redact_url(url)),
                )
                .with_source(mapped)
            })?;
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
    let columns = "INSERT INTO {t} (id, stream, destination, msg_key, okey, payload, content_type, headers, strategy, \
           status, attempts, created_at, next_attempt_at, locked_by, locked_until, last_error, signature, \
           on_exhausted)"
        .replace("{t}", t);
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

impl MySqlStore {
    /// Make sure each unit has its row of `<table>_locks` before a writer's transaction locks
    /// it, creating missing ones on connections of their own, each insert committed at once
    /// (`due = 0`: the writer's lock makes the unit known to claims). A lock row created
    /// inside a writer's transaction deadlocks when that transaction rolls back: the writers
    /// waiting on the new row inherit locks on the gap it leaves, and each then waits for the
    /// other's to insert it. An existing row is locked without a gap. Lock rows are never
    /// deleted, so a unit seen once needs no look-up again.
    async fn ensure_lock_rows(&self, units: &[Unit]) -> outbox_core::Result<()> {
        let unknown: Vec<&Unit> = {
            let known = self.inner.known.lock().unwrap_or_else(|p| p.into_inner());
            units.iter().filter(|u| !known.contains(*u)).collect()
        };
        if unknown.is_empty() {
            return Ok(());
        }
        let t = &self.inner.table;
        let side = self
            .inner
            .side
            .get_or_try_init(|| async {
                let options = self.inner.pool.connect_options().as_ref().clone();
                Ok::<_, Error>(
                    MySqlPoolOptions::new()
                        .max_connections(2)
                        .min_connections(0)
                        .acquire_timeout(self.inner.pool.options().get_acquire_timeout())
                        .connect_lazy_with(options),
                )
            })
            .await?;
        for (stream, key) in unknown {
            // A plain read first: an insert that met an existing row would wait for the
            // writer holding it.
            let exists: Option<i64> = sqlx::query_scalar(&format!(
                "SELECT 1 FROM {t}_locks WHERE stream = ? AND okey = ?"
            ))
            .bind(stream)
            .bind(key)
            .fetch_optional(side)
            .await
            .map_err(map_err)?;
            if exists.is_none() {
                sqlx::query(&format!(
                    "INSERT IGNORE INTO {t}_locks (stream, okey, due) VALUES (?, ?, 0)"
                ))
                .bind(stream)
                .bind(key)
                .execute(side)
                .await
                .map_err(map_err)?;
            }
            let mut known = self.inner.known.lock().unwrap_or_else(|p| p.into_inner());
            if known.len() >= KNOWN_UNITS {
                known.clear();
            }
            known.insert((stream.clone(), key.clone()));
        }
        Ok(())
    }

    /// Un-park (`stream`, `unit`) in `tx`: due now, its failed rows with a fresh retry budget.
    async fn resume(
        &self,
        tx: &mut Transaction<'_, MySql>,
        stream: &str,
        unit: &str,
    ) -> outbox_core::Result<()> {
        let t = &self.inner.table;
        let resumed = sqlx::query(&format!(
            "UPDATE {t}_due SET parked_at = NULL, parked_reason = NULL, next_at = {NOW}, leased_by = NULL,
               claims = 0
             WHERE stream = ? AND okey = ? AND parked_at IS NOT NULL"
        ))
        .bind(stream)
        .bind(unit)
        .execute(&mut **tx)
        .await
        .map_err(map_err)?
        .rows_affected();
        if resumed == 0 {
            return Err(outbox_core::no_such_unit(stream, unit, true));
        }
        sqlx::query(&format!(
            "UPDATE {t} SET attempts = 0, next_attempt_at = LEAST(next_attempt_at, {NOW})
             WHERE status = 'pending' AND stream = ? AND okey = ? AND strategy <> 'on_commit' AND attempts > 0"
        ))
        .bind(stream)
        .bind(unit)
        .execute(&mut **tx)
        .await
        .map_err(map_err)?;
        Ok(())
    }

    /// The server's NO PAD binary collation: names compare byte for byte, so `a` and `a `
    /// (and `a` and `A`, `é` and `e` + combining accent) are different streams and units.
    /// `utf8mb4_bin` is PAD SPACE: `=` and unique keys ignore trailing spaces.
    /// The tables `migrate` creates for a new outbox, for a DBA to review and run as their
    /// owner (`outbox migrate --print-sql`); the server is asked which exact collation it
    /// has. Upgrading an existing table (columns added later, indexes converted) is
    /// `migrate`'s work, run as the owner.
    pub async fn schema_sql(&self) -> outbox_core::Result<Vec<String>> {
        let c = self.exact_collation().await?;
        Ok(create_tables(&self.inner.table, c).to_vec())
    }

    async fn exact_collation(&self) -> outbox_core::Result<&'static str> {
        Ok(if self.is_mariadb().await? {
            "utf8mb4_nopad_bin"
        } else {
            "utf8mb4_0900_bin"
        })
    }

    async fn is_mariadb(&self) -> outbox_core::Result<bool> {
        self.inner
            .mariadb
            .get_or_try_init(|| async {
                let version: String = sqlx::query_scalar("SELECT VERSION()")
                    .fetch_one(&self.inner.pool)
                    .await
                    .map_err(map_err)?;
                Ok(version.to_ascii_lowercase().contains("mariadb"))
            })
            .await
            .copied()
    }

    /// `statement` (an `UPDATE`, `INSERT` or `SELECT`) waiting at most `lock_timeout` for a
    /// row lock.
    async fn bounded(&self, statement: &str) -> outbox_core::Result<String> {
        let secs = self.inner.lock_timeout.as_secs_f64().ceil().max(1.0) as u64;
        Ok(if self.is_mariadb().await? {
            format!("SET STATEMENT innodb_lock_wait_timeout = {secs} FOR {statement}")
        } else {
            let (verb, rest) = statement.split_at(statement.find(' ').unwrap_or(0));
            format!("{verb} /*+ SET_VAR(innodb_lock_wait_timeout = {secs}) */{rest}")
        })
    }

    /// `ALTER TABLE table {ddl}` unless `table` has `column` (MySQL 8 has no ADD COLUMN IF
    /// NOT EXISTS; a concurrent migrate that added it first is fine).
    async fn add_column(&self, table: &str, column: &str, ddl: &str) -> outbox_core::Result<()> {
        let has: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.COLUMNS
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND COLUMN_NAME = ?",
        )
        .bind(table)
        .bind(column)
        .fetch_one(&self.inner.pool)
        .await
        .map_err(map_err)?;
        if has > 0 {
            return Ok(());
        }
        match sqlx::query(&format!("ALTER TABLE {table} {ddl}"))
            .execute(&self.inner.pool)
            .await
        {
            Ok(_) => Ok(()),
            // Duplicate column or key: another migrate was first.
            Err(sqlx::Error::Database(db))
                if db
                    .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
                    .is_some_and(|e| matches!(e.number(), 1060 | 1061)) =>
            {
                Ok(())
            }
            Err(e) => Err(map_err(e)),
        }
    }

    async fn index_exists(&self, name: &str) -> outbox_core::Result<bool> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.STATISTICS
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND INDEX_NAME = ?",
        )
        .bind(&self.inner.table)
        .bind(name)
        .fetch_one(&self.inner.pool)
        .await
        .map_err(map_err)?;
        Ok(n > 0)
    }

    /// Keep-order rows whose unit the claim does not know (written by an older version, by
    /// SQL, or moved to another unit by hand) get their unit rows: the distinct units of
    /// `<table>_unit` (a loose index scan, never the rows). On the first claim, then at most
    /// once every [`ADOPT_EVERY`], or now when `force`.
    async fn adopt_orphans(&self, force: bool) -> outbox_core::Result<()> {
        {
            let last = self.inner.adopted.lock().unwrap_or_else(|p| p.into_inner());
            if !force && last.is_some_and(|t| t.elapsed() < ADOPT_EVERY) {
                return Ok(());
            }
        }
        let t = &self.inner.table;
        let orphans: Vec<Unit> = sqlx::query_as(&format!(
            "SELECT CONVERT(w.stream USING utf8mb4), CONVERT(w.okey USING utf8mb4)
             FROM (SELECT DISTINCT stream, okey FROM {t} WHERE status = 'pending') w
             WHERE NOT EXISTS (SELECT 1 FROM {t}_due d WHERE d.stream = w.stream AND d.okey = w.okey)
               AND EXISTS (SELECT 1 FROM {t} o WHERE o.status = 'pending' AND o.stream = w.stream
                           AND o.okey = w.okey AND o.strategy <> 'on_commit')"
        ))
        .fetch_all(&self.inner.pool)
        .await
        .map_err(map_err)?;
        // A writer holding one of these units is waited for no longer than a claim would
        // (not the server's innodb_lock_wait_timeout, 50 s by default).
        let statements = [
            self.bounded(&format!(
                "INSERT INTO {t}_locks (stream, okey) VALUES (?, ?) ON DUPLICATE KEY UPDATE due = 1"
            ))
            .await?,
            self.bounded(&format!(
                "INSERT IGNORE INTO {t}_due (stream, okey, next_at) VALUES (?, ?, 0)"
            ))
            .await?,
        ];
        for (stream, key) in &orphans {
            for sql in &statements {
                sqlx::query(sql)
                    .bind(stream)
                    .bind(key)
                    .execute(&self.inner.pool)
                    .await
                    .map_err(map_err)?;
            }
        }
        if !force {
            *self.inner.adopted.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(std::time::Instant::now());
        }
        Ok(())
    }

    /// One claim transaction: lock due units (SKIP LOCKED: a unit is claimed by one relay at a
    /// time), read each unit's first rows through `<table>_unit` (a blocked unit's rows are
    /// never read) and the due publish-on-commit rows through `<table>_oc`, take them in `seq`
    /// order within the limit and the byte budget, lease them and their units. Returns the
    /// rows and the units that had no pending row.
    async fn claim_once(
        &self,
        claim: &Claim,
    ) -> outbox_core::Result<(Vec<outbox_core::Claimed>, Vec<Unit>)> {
        let t = &self.inner.table;
        let mut conn = self.inner.pool.acquire().await.map_err(map_err)?;
        // Each statement sees the latest committed rows.
        sqlx::query("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            .execute(&mut *conn)
            .await
            .map_err(map_err)?;
        let update_rows = self
            .bounded(&format!(
                "UPDATE {t} SET locked_by = ?, locked_until = ?, next_attempt_at = ?, claims = claims + 1 WHERE seq IN "
            ))
            .await?;
        let mut tx = sqlx::Connection::begin(&mut *conn).await.map_err(map_err)?;
        let (filter, streams) = match &claim.streams {
            StreamFilter::All => (String::new(), vec![]),
            StreamFilter::Only(s) => (format!(" AND stream IN ({})", list(s.len())), s.clone()),
        };
        let now: i64 = sqlx::query_scalar(&format!("SELECT {NOW}"))
            .fetch_one(&mut *tx)
            .await
            .map_err(map_err)?;
        let due = format!(
            "SELECT CONVERT(stream USING utf8mb4), CONVERT(okey USING utf8mb4), claims FROM {t}_due
             WHERE next_at <= ?{filter} ORDER BY next_at LIMIT ? FOR UPDATE SKIP LOCKED"
        );
        let mut q = sqlx::query_as::<_, (String, String, i64)>(&due).bind(now);
        for s in &streams {
            q = q.bind(s);
        }
        // Each unit's claims without an outcome so far (this claim adds one when it takes rows).
        let (units, unit_claims): (Vec<Unit>, Vec<i64>) = q
            .bind(claim.limit as i64)
            .fetch_all(&mut *tx)
            .await
            .map_err(map_err)?
            .into_iter()
            .map(|(s, k, n)| ((s, k), n))
            .unzip();
        let mut candidates: Vec<Candidate> = Vec::new();
        let mut seen = vec![false; units.len()];
        if !units.is_empty() {
            let per = (claim.limit / units.len()).max(1) as i64;
            let one = format!(
                "(SELECT seq, CONVERT(stream USING utf8mb4), CONVERT(okey USING utf8mb4),
                   CAST(LENGTH(payload) + LENGTH(headers) AS SIGNED),
                   CASE WHEN locked_until > ? THEN 0 WHEN next_attempt_at > ? THEN next_attempt_at END
                 FROM {t} WHERE status = 'pending' AND stream = ? AND okey = ? AND strategy <> 'on_commit'
                 ORDER BY seq LIMIT ?)"
            );
            let sql = vec![one.as_str(); units.len()].join(" UNION ALL ");
            let mut q = sqlx::query_as::<_, (i64, String, String, i64, Option<i64>)>(&sql);
            for (stream, key) in &units {
                q = q.bind(now).bind(now).bind(stream).bind(key).bind(per);
            }
            let index: std::collections::HashMap<&Unit, usize> =
                units.iter().enumerate().map(|(i, u)| (u, i)).collect();
            for (seq, stream, key, size, blocked) in q.fetch_all(&mut *tx).await.map_err(map_err)? {
                let unit = index.get(&(stream, key)).copied();
                if let Some(u) = unit {
                    seen[u] = true;
                }
                candidates.push(Candidate {
                    seq,
                    unit,
                    size: size.max(0) as usize,
                    blocked,
                });
            }
        }
        // A unit yields its rows before its first blocked one.
        candidates.sort_by_key(|c| c.seq);
        let mut stopped = vec![None::<i64>; units.len()];
        candidates.retain(|c| match (c.unit, c.blocked) {
            (Some(u), _) if stopped[u].is_some() => false,
            (Some(u), Some(until)) => {
                stopped[u] = Some(until);
                false
            }
            _ => true,
        });
        let on_commit = format!(
            "SELECT seq, CAST(LENGTH(payload) + LENGTH(headers) AS SIGNED) FROM {t}
             WHERE strategy = 'on_commit' AND status = 'pending' AND next_attempt_at <= ?
               AND (locked_until IS NULL OR locked_until <= ?){filter}
             ORDER BY next_attempt_at LIMIT ? FOR UPDATE SKIP LOCKED"
        );
        let mut q = sqlx::query_as::<_, (i64, i64)>(&on_commit)
            .bind(now)
            .bind(now);
        for s in &streams {
            q = q.bind(s);
        }
        for (seq, size) in q
            .bind(claim.limit as i64)
            .fetch_all(&mut *tx)
            .await
            .map_err(map_err)?
        {
            candidates.push(Candidate {
                seq,
                unit: None,
                size: size.max(0) as usize,
                blocked: None,
            });
        }
        candidates.sort_by_key(|c| c.seq);
        candidates.truncate(claim.limit);
        let sizes: Vec<usize> = candidates.iter().map(|c| c.size).collect();
        let fits = claim.within_budget(&sizes);
        let taken: Vec<&Candidate> = candidates
            .iter()
            .zip(fits)
            .take_while(|(_, fits)| *fits)
            .map(|(c, _)| c)
            .collect();
        let mut rows = Vec::with_capacity(taken.len());
        if !taken.is_empty() {
            let load = format!(
                "SELECT {cols}, CAST(LENGTH(payload) + LENGTH(headers) AS SIGNED), claims + 1 FROM {t}
                 WHERE seq IN ({}) ORDER BY seq",
                list(taken.len()),
                cols = COLS.replacen(
                    "payload,",
                    "CASE WHEN LENGTH(payload) > ? THEN NULL ELSE payload END,",
                    1
                )
            );
            let mut q = sqlx::query(&load).bind(claim.max_row_bytes as i64);
            for c in &taken {
                q = q.bind(c.seq);
            }
            for row in q.fetch_all(&mut *tx).await.map_err(map_err)? {
                rows.push(claimed(&row, claim)?);
            }
            // Keep-order rows count their unit's claims.
            let unit_of: std::collections::HashMap<i64, usize> = taken
                .iter()
                .filter_map(|c| c.unit.map(|u| (c.seq, u)))
                .collect();
            for m in rows.iter_mut().flatten() {
                if let Some(&u) = unit_of.get(&m.seq) {
                    m.claims = (unit_claims[u] + 1).clamp(0, u32::MAX as i64) as u32;
                }
            }
            // Publish-on-commit rows carry their own lease (locked with SKIP LOCKED above);
            // keep-order rows are leased through their unit (no row is rewritten).
            let until = now + claim.lease.as_millis() as i64;
            let on_commit: Vec<i64> = taken
                .iter()
                .filter(|c| c.unit.is_none())
                .map(|c| c.seq)
                .collect();
            if !on_commit.is_empty() {
                let update = format!("{update_rows}({})", list(on_commit.len()));
                let mut q = sqlx::query(&update)
                    .bind(&claim.owner)
                    .bind(until)
                    .bind(until);
                for seq in &on_commit {
                    q = q.bind(seq);
                }
                q.execute(&mut *tx).await.map_err(map_err)?;
            }
            // The units rows were taken from are leased with them.
            let mut leased: Vec<usize> = taken.iter().filter_map(|c| c.unit).collect();
            leased.sort_unstable();
            leased.dedup();
            if !leased.is_empty() {
                let sql = format!(
                    "UPDATE {} SET d.next_at = ?, d.leased_by = ?, d.claims = d.claims + 1",
                    units_join(t, leased.len())
                );
                let mut q = sqlx::query(&sql);
                for &u in &leased {
                    q = q.bind(&units[u].0).bind(&units[u].1);
                }
                q.bind(until)
                    .bind(&claim.owner)
                    .execute(&mut *tx)
                    .await
                    .map_err(map_err)?;
            }
            for &u in &leased {
                stopped[u] = None;
            }
        }
        // A unit whose head backs off is due at the head's retry time.
        for (u, until) in stopped.iter().enumerate() {
            if let Some(until) = until.filter(|&until| until > 0) {
                sqlx::query(&format!(
                    "UPDATE {t}_due SET next_at = ? WHERE stream = ? AND okey = ?"
                ))
                .bind(until)
                .bind(&units[u].0)
                .bind(&units[u].1)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
            }
        }
        tx.commit().await.map_err(map_err)?;
        let empty = units
            .into_iter()
            .zip(seen)
            .filter(|(_, seen)| !seen)
            .map(|(u, _)| u)
            .collect();
        Ok((rows, empty))
    }

    /// Forget units a claim found with no pending row: under the units' writer locks (skipping
    /// a unit a writer holds: it is not empty for long), a fresh read confirms each is still
    /// empty before its row of `<table>_due` goes and its lock row says `due = 0`.
    async fn forget_empty_units(&self, units: &[Unit]) -> outbox_core::Result<()> {
        let t = &self.inner.table;
        let mut conn = self.inner.pool.acquire().await.map_err(map_err)?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            .execute(&mut *conn)
            .await
            .map_err(map_err)?;
        let mut tx = sqlx::Connection::begin(&mut *conn).await.map_err(map_err)?;
        for (stream, key) in units {
            let locked: Option<i64> = sqlx::query_scalar(&format!(
                "SELECT 1 FROM {t}_locks WHERE stream = ? AND okey = ? FOR UPDATE SKIP LOCKED"
            ))
            .bind(stream)
            .bind(key)
            .fetch_optional(&mut *tx)
            .await
            .map_err(map_err)?;
            if locked.is_none() {
                continue;
            }
            let pending: Option<i64> = sqlx::query_scalar(&format!(
                "SELECT seq FROM {t} WHERE status = 'pending' AND stream = ? AND okey = ?
                   AND strategy <> 'on_commit' LIMIT 1"
            ))
            .bind(stream)
            .bind(key)
            .fetch_optional(&mut *tx)
            .await
            .map_err(map_err)?;
            if pending.is_some() {
                continue;
            }
            // The lock row stays (see `lock_units`), marked as not known to claims.
            for statement in [
                format!("DELETE FROM {t}_due WHERE stream = ? AND okey = ?"),
                format!("UPDATE {t}_locks SET due = 0 WHERE stream = ? AND okey = ?"),
            ] {
                sqlx::query(&statement)
                    .bind(stream)
                    .bind(key)
                    .execute(&mut *tx)
                    .await
                    .map_err(map_err)?;
            }
        }
        tx.commit().await.map_err(map_err)
    }

    /// A batch's outcome in one transaction: the units first (a unit whose head failed gets
    /// its retry time, the others are free again; only while `owner` still holds them, any
    /// holder for `complete`), then the published rows, then the failures.
    async fn settle_rows(
        &self,
        owner: Option<&str>,
        done: &[i64],
        delete: bool,
        failures: &[Failure],
    ) -> outbox_core::Result<()> {
        if done.is_empty() && failures.is_empty() {
            return Ok(());
        }
        let t = &self.inner.table;
        let mut conn = self.inner.pool.acquire().await.map_err(map_err)?;
        // No gap locks: writers inserting a new unit's rows never wait on (or deadlock with)
        // a settle; every lock below is a row found by its primary key.
        sqlx::query("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            .execute(&mut *conn)
            .await
            .map_err(map_err)?;
        let mut tx = sqlx::Connection::begin(&mut *conn).await.map_err(map_err)?;
        let all: Vec<i64> = done
            .iter()
            .copied()
            .chain(failures.iter().map(|f| f.seq))
            .collect();
        let now: i64 = sqlx::query_scalar(&format!("SELECT {NOW}"))
            .fetch_one(&mut *tx)
            .await
            .map_err(map_err)?;
        // Each unit's delay: the longest retry among its failures, else none.
        let mut delays: std::collections::BTreeMap<Unit, i64> = Default::default();
        let mut units_of: std::collections::HashMap<i64, Unit> = Default::default();
        for chunk in all.chunks(1000) {
            let sql = format!(
                "SELECT seq, CONVERT(stream USING utf8mb4), CONVERT(okey USING utf8mb4) FROM {t}
                 WHERE seq IN ({}) AND strategy <> 'on_commit'",
                list(chunk.len())
            );
            let mut q = sqlx::query_as::<_, (i64, String, String)>(&sql);
            for seq in chunk {
                q = q.bind(seq);
            }
            for (seq, stream, key) in q.fetch_all(&mut *tx).await.map_err(map_err)? {
                let delay = failures
                    .iter()
                    .filter(|f| f.seq == seq)
                    .map(|f| match f.outcome {
                        Outcome::Retry { after } => after.as_millis() as i64,
                        _ => 0,
                    })
                    .max()
                    .unwrap_or(0);
                let d = delays.entry((stream.clone(), key.clone())).or_insert(0);
                *d = (*d).max(delay);
                units_of.insert(seq, (stream, key));
            }
        }
        // The units `owner` still holds (locked first: claims lock units, then rows), waiting
        // at most `lock_timeout` for a session that holds one.
        let mut held: std::collections::BTreeSet<Unit> = Default::default();
        if let Some(owner) = owner {
            let units: Vec<&Unit> = delays.keys().collect();
            for chunk in units.chunks(500) {
                let sql = self
                    .bounded(&format!(
                        "SELECT CONVERT(d.stream USING utf8mb4), CONVERT(d.okey USING utf8mb4) FROM {}
                         WHERE d.leased_by = ? FOR UPDATE",
                        units_join(t, chunk.len())
                    ))
                    .await?;
                let mut q = sqlx::query_as::<_, Unit>(&sql);
                for (stream, key) in chunk {
                    q = q.bind(stream).bind(key);
                }
                held.extend(q.bind(owner).fetch_all(&mut *tx).await.map_err(map_err)?);
            }
        }
        for chunk in done.chunks(1000) {
            let sql = if delete {
                format!("DELETE o FROM {}", seqs_join(t, chunk.len()))
            } else {
                format!(
                    "UPDATE {} SET o.status = 'sent', o.sent_at = ?, o.locked_by = NULL, o.locked_until = NULL",
                    seqs_join(t, chunk.len())
                )
            };
            let mut q = sqlx::query(&sql);
            for s in chunk {
                q = q.bind(s);
            }
            if !delete {
                q = q.bind(now);
            }
            q.execute(&mut *tx).await.map_err(map_err)?;
        }
        // A failure applies to a row `owner` holds: a publish-on-commit row leased to it, a
        // keep-order row of a unit it holds. One statement for the attempts (retries and dead
        // letters) and one for the releases, per 500 rows: per-row values by CASE on `seq`.
        let owner_name = owner.unwrap_or_default();
        let (attempted, released): (Vec<&Failure>, Vec<&Failure>) = failures
            .iter()
            .partition(|f| !matches!(f.outcome, Outcome::Release));
        let guard = |chunk: &[&Failure]| -> (String, Vec<i64>) {
            let mine: Vec<i64> = chunk
                .iter()
                .filter(|f| units_of.get(&f.seq).is_some_and(|u| held.contains(u)))
                .map(|f| f.seq)
                .collect();
            let sql = if mine.is_empty() {
                "locked_by = ?".to_owned()
            } else {
                format!("(locked_by = ? OR seq IN ({}))", list(mine.len()))
            };
            (sql, mine)
        };
        for chunk in attempted.chunks(500) {
            let (guard_sql, mine) = guard(chunk);
            let whens = vec!["WHEN ? THEN ?"; chunk.len()].join(" ");
            let dead: Vec<i64> = chunk
                .iter()
                .filter(|f| matches!(f.outcome, Outcome::Dead))
                .map(|f| f.seq)
                .collect();
            let retries: Vec<(i64, i64)> = chunk
                .iter()
                .filter_map(|f| match f.outcome {
                    Outcome::Retry { after } => Some((f.seq, now + after.as_millis() as i64)),
                    _ => None,
                })
                .collect();
            let next_at = if retries.is_empty() {
                "next_attempt_at".to_owned()
            } else {
                format!(
                    "CASE seq {} ELSE next_attempt_at END",
                    vec!["WHEN ? THEN ?"; retries.len()].join(" ")
                )
            };
            let status = if dead.is_empty() {
                "status".to_owned()
            } else {
                format!(
                    "CASE WHEN seq IN ({}) THEN 'dead' ELSE status END",
                    list(dead.len())
                )
            };
            let sql = format!(
                "UPDATE {t} SET attempts = attempts + 1,
                   last_error = CASE seq {whens} END,
                   next_attempt_at = {next_at},
                   status = {status}, locked_by = NULL, locked_until = NULL, claims = 0
                 WHERE seq IN ({}) AND status = 'pending' AND {guard_sql}",
                list(chunk.len())
            );
            let mut q = sqlx::query(&sql);
            for f in chunk {
                q = q.bind(f.seq).bind(&f.error);
            }
            for (seq, next) in &retries {
                q = q.bind(seq).bind(next);
            }
            for seq in &dead {
                q = q.bind(seq);
            }
            for f in chunk {
                q = q.bind(f.seq);
            }
            q = q.bind(owner_name);
            for seq in &mine {
                q = q.bind(seq);
            }
            q.execute(&mut *tx).await.map_err(map_err)?;
        }
        for chunk in released.chunks(500) {
            let (guard_sql, mine) = guard(chunk);
            let sql = format!(
                "UPDATE {t} SET locked_by = NULL, locked_until = NULL, claims = 0,
                   next_attempt_at = CASE WHEN strategy = 'on_commit' THEN ? ELSE next_attempt_at END
                 WHERE seq IN ({}) AND status = 'pending' AND {guard_sql}",
                list(chunk.len())
            );
            let mut q = sqlx::query(&sql).bind(now);
            for f in chunk {
                q = q.bind(f.seq);
            }
            q = q.bind(owner_name);
            for seq in &mine {
                q = q.bind(seq);
            }
            q.execute(&mut *tx).await.map_err(map_err)?;
        }
        // The units, one statement per retry delay (all free again but those whose head
        // failed).
        let mut by_delay: std::collections::BTreeMap<i64, Vec<&Unit>> = Default::default();
        for (unit, delay) in &delays {
            if owner.is_none() || held.contains(unit) {
                by_delay.entry(*delay).or_default().push(unit);
            }
        }
        for (delay, units) in by_delay {
            for chunk in units.chunks(500) {
                let sql = format!(
                    "UPDATE {} SET d.next_at = ?, d.leased_by = NULL, d.claims = 0 WHERE d.parked_at IS NULL",
                    units_join(t, chunk.len())
                );
                let mut q = sqlx::query(&sql);
                for (stream, key) in chunk {
                    q = q.bind(stream).bind(key);
                }
                q.bind(now + delay)
                    .execute(&mut *tx)
                    .await
                    .map_err(map_err)?;
            }
        }
        tx.commit().await.map_err(map_err)
    }

    /// Tables made before names were exact used `utf8mb4_bin`: convert their name columns and
    /// the lock table. Stored values keep their bytes (PAD SPACE affects comparisons, not
    /// storage), so rows whose names differed only by trailing spaces get their own streams
    /// and units back; no row moves and `seq` order is kept.
    async fn convert_to_exact_names(&self, c: &str) -> outbox_core::Result<()> {
        let t = &self.inner.table;
        let stale: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.COLUMNS
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME IN (?, ?)
               AND COLUMN_NAME IN ('stream', 'msg_key', 'okey', 'locked_by')
               AND (COLLATION_NAME IS NULL OR COLLATION_NAME <> ?)",
        )
        .bind(t)
        .bind(format!("{t}_locks"))
        .bind(c)
        .fetch_one(&self.inner.pool)
        .await
        .map_err(map_err)?;
        if stale == 0 {
            return Ok(());
        }
        tracing::info!(table = %t, collation = c, "converting name columns to a byte-exact collation");
        for statement in [
            format!(
                "ALTER TABLE {t}
                    MODIFY stream VARCHAR(255) COLLATE {c} NOT NULL,
                    MODIFY msg_key VARCHAR(255) COLLATE {c} NULL,
                    MODIFY okey VARCHAR(255) COLLATE {c} NOT NULL,
                    MODIFY locked_by VARCHAR(64) COLLATE {c} NULL"
            ),
            format!("ALTER TABLE {t}_locks CONVERT TO CHARACTER SET utf8mb4 COLLATE {c}"),
        ] {
            sqlx::query(&statement)
                .execute(&self.inner.pool)
                .await
                .map_err(map_err)?;
        }
        Ok(())
    }
}

#[async_trait]
impl Store for MySqlStore {
    fn signing_scope(&self) -> String {
        self.inner.table.clone()
    }

    async fn migrate(&self) -> outbox_core::Result<()> {
        let t = &self.inner.table;
        let c = self.exact_collation().await?;
        let [outbox, locks, due] = create_tables(t, c);
        let statements = [outbox, locks];
        for s in statements {
            sqlx::query(&s)
                .execute(&self.inner.pool)
                .await
                .map_err(map_err)?;
        }
        self.convert_to_exact_names(c).await?;
        sqlx::query(&due)
            .execute(&self.inner.pool)
            .await
            .map_err(map_err)?;
        // Columns added after a table's first version.
        self.add_column(
            t,
            "on_exhausted",
            "ADD COLUMN on_exhausted VARCHAR(16) NULL",
        )
        .await?;
        self.add_column(t, "claims", "ADD COLUMN claims INT NOT NULL DEFAULT 0")
            .await?;
        // Writers tell a new or forgotten unit from a known one by these (see `lock_units`);
        // every lock row of an older table has its row of `<table>_due`.
        for (column, ddl) in [
            ("writes", "ADD COLUMN writes BIGINT NOT NULL DEFAULT 0"),
            ("due", "ADD COLUMN due TINYINT NOT NULL DEFAULT 1"),
        ] {
            self.add_column(&format!("{t}_locks"), column, ddl).await?;
        }
        self.add_column(
            &format!("{t}_due"),
            "claims",
            "ADD COLUMN claims INT NOT NULL DEFAULT 0",
        )
        .await?;
        self.add_column(
            &format!("{t}_due"),
            "parked_at",
            "ADD COLUMN parked_at BIGINT NULL, ADD COLUMN parked_reason TEXT NULL, ADD KEY due_parked (parked_at)",
        )
        .await?;
        // Tables made before claims went by unit: their indexes and the claim lock table go,
        // publish-on-commit rows get an index of their own, leased ones are due at the
        // lease's end, and every unit with pending rows gets its rows of the unit tables.
        for index in ["leased", "backoff"] {
            if self.index_exists(&format!("{t}_{index}")).await? {
                sqlx::query(&format!("ALTER TABLE {t} DROP INDEX {t}_{index}"))
                    .execute(&self.inner.pool)
                    .await
                    .map_err(map_err)?;
            }
        }
        for (index, columns) in [
            ("oc", "strategy, status, next_attempt_at"),
            // Dead letters are listed (and bulk-requeued) oldest first in pages: through this
            // index a page reads its own rows, not every dead row.
            ("dead", "status, created_at"),
        ] {
            if !self.index_exists(&format!("{t}_{index}")).await? {
                sqlx::query(&format!(
                    "ALTER TABLE {t} ADD INDEX {t}_{index} ({columns})"
                ))
                .execute(&self.inner.pool)
                .await
                .map_err(map_err)?;
            }
        }
        for statement in [
            format!("DROP TABLE IF EXISTS {t}_claim"),
            format!(
                "UPDATE {t} SET next_attempt_at = locked_until
                 WHERE strategy = 'on_commit' AND status = 'pending' AND locked_until > next_attempt_at"
            ),
        ] {
            sqlx::query(&statement)
                .execute(&self.inner.pool)
                .await
                .map_err(map_err)?;
        }
        self.adopt_orphans(true).await?;
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
            if !empty.is_empty() {
                self.forget_empty_units(&empty).await?;
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

#[async_trait]
impl StoreAdmin for MySqlStore {
    async fn schema(&self) -> outbox_core::Result<outbox_core::SchemaReport> {
        let names = |list: &[&str]| -> Vec<String> {
            list.iter()
                .map(|n| n.replace("{t}", &self.inner.table))
                .collect()
        };
        // What `migrate` makes (`create_tables` and the indexes it adds), and what it drops.
        // Index names are per table here: `table.index`.
        let expected = names(&[
            "{t}",
            "{t}_locks",
            "{t}_due",
            "{t}.{t}_id",
            "{t}.{t}_unit",
            "{t}.{t}_oc",
            "{t}.{t}_sent",
            "{t}.{t}_dead",
            "{t}_due.due_next",
            "{t}_due.due_parked",
        ]);
        let legacy = names(&["{t}_claim", "{t}.{t}_leased", "{t}.{t}_backoff"]);
        outbox_core::SchemaReport::check(&expected, &legacy, |name| async move {
            let n: i64 = match name.split_once('.') {
                None => sqlx::query_scalar(
                    "SELECT COUNT(*) FROM information_schema.TABLES
                     WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?",
                )
                .bind(name),
                Some((table, index)) => sqlx::query_scalar(
                    "SELECT COUNT(*) FROM information_schema.STATISTICS
                     WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND INDEX_NAME = ?",
                )
                .bind(table.to_owned())
                .bind(index.to_owned()),
            }
            .fetch_one(&self.inner.pool)
            .await
            .map_err(map_err)?;
            Ok(n > 0)
        })
        .await
    }

    async fn requeue(&self, sel: &Selector) -> outbox_core::Result<u64> {
        let (clause, vals) = selector(sel);
        let t = &self.inner.table;
        // Keep-order rows come back to their unit: under the units' writer locks (as an enqueue
        // takes them), the rows turn pending and their units become due.
        let mut tx = self.inner.pool.begin().await.map_err(map_err)?;
        let units_sql = format!(
            "SELECT DISTINCT CONVERT(stream USING utf8mb4), CONVERT(okey USING utf8mb4) FROM {t}
             WHERE status = 'dead' AND strategy <> 'on_commit'{clause} ORDER BY 1, 2"
        );
        let units: Vec<Unit> = sqlx_value::bind(sqlx::query(&units_sql), &vals)
            .fetch_all(&mut *tx)
            .await
            .map_err(map_err)?
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(map_err)?;
        lock_units(&mut tx, t, &units).await?;
        for (stream, key) in &units {
            sqlx::query(&format!(
                "UPDATE {t}_due SET next_at = LEAST(next_at, {NOW})
                 WHERE stream = ? AND okey = ? AND parked_at IS NULL"
            ))
            .bind(stream)
            .bind(key)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        }
        let sql = format!(
            "UPDATE {t} SET status = 'pending', attempts = 0, next_attempt_at = {NOW}, locked_by = NULL,
               locked_until = NULL WHERE status = 'dead'{clause}"
        );
        let n = sqlx_value::bind(sqlx::query(&sql), &vals)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?
            .rows_affected();
        tx.commit().await.map_err(map_err)?;
        self.inner.notify.notify_one();
        Ok(n)
    }

    async fn resume_unit(&self, stream: &str, unit: &str) -> outbox_core::Result<()> {
        let mut tx = self.inner.pool.begin().await.map_err(map_err)?;
        if let Err(e) = self.resume(&mut tx, stream, unit).await {
            return Err(rolled_back(tx, e).await);
        }
        tx.commit().await.map_err(map_err)?;
        self.inner.notify.notify_one();
        Ok(())
    }

    async fn skip_head(&self, stream: &str, unit: &str) -> outbox_core::Result<Option<i64>> {
        let t = &self.inner.table;
        let mut tx = self.inner.pool.begin().await.map_err(map_err)?;
        let parked: Option<i64> = sqlx::query_scalar(&format!(
            "SELECT 1 FROM {t}_due WHERE stream = ? AND okey = ? AND parked_at IS NOT NULL FOR UPDATE"
        ))
        .bind(stream)
        .bind(unit)
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_err)?;
        if parked.is_none() {
            return Err(rolled_back(tx, outbox_core::no_such_unit(stream, unit, true)).await);
        }
        let head: Option<i64> = sqlx::query_scalar(&format!(
            "SELECT seq FROM {t} WHERE status = 'pending' AND stream = ? AND okey = ?
               AND strategy <> 'on_commit' ORDER BY seq LIMIT 1 FOR UPDATE"
        ))
        .bind(stream)
        .bind(unit)
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_err)?;
        if let Some(seq) = head {
            sqlx::query(&format!(
                "UPDATE {t} SET status = 'dead', locked_by = NULL, locked_until = NULL,
                   last_error = CONCAT(IFNULL(CONCAT(last_error, ' '), ''), '[skipped by an operator]')
                 WHERE seq = ?"
            ))
            .bind(seq)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        }
        if let Err(e) = self.resume(&mut tx, stream, unit).await {
            return Err(rolled_back(tx, e).await);
        }
        tx.commit().await.map_err(map_err)?;
        self.inner.notify.notify_one();
        Ok(head)
    }

    async fn parked_units(
        &self,
        stream: Option<&str>,
        limit: usize,
    ) -> outbox_core::Result<Vec<outbox_core::ParkedUnit>> {
        let t = &self.inner.table;
        let rows: Vec<(String, String, i64, Option<String>, Option<i64>)> =
            sqlx::query_as(&format!(
                "SELECT CONVERT(d.stream USING utf8mb4), CONVERT(d.okey USING utf8mb4), d.parked_at,
                   CONVERT(d.parked_reason USING utf8mb4),
                   (SELECT o.seq FROM {t} o WHERE o.status = 'pending' AND o.stream = d.stream
                      AND o.okey = d.okey AND o.strategy <> 'on_commit' ORDER BY o.seq LIMIT 1)
                 FROM {t}_due d WHERE d.parked_at IS NOT NULL AND (? IS NULL OR d.stream = ?)
                 ORDER BY d.parked_at LIMIT ?"
            ))
            .bind(stream)
            .bind(stream)
            .bind(limit.min(i64::MAX as usize) as i64)
            .fetch_all(&self.inner.pool)
            .await
            .map_err(map_err)?;
        // Counted per unit, up to the cap (MariaDB refuses the outer reference in a derived
        // table, which a capped count in the listing would need).
        let count = format!(
            "SELECT COUNT(*) FROM (SELECT 1 FROM {t} WHERE status = 'pending' AND stream = ? AND okey = ?
               AND strategy <> 'on_commit' LIMIT {cap}) c",
            cap = outbox_core::PARKED_COUNT_CAP
        );
        let mut out = Vec::with_capacity(rows.len());
        for (stream, unit, at, reason, head) in rows {
            let pending: i64 = sqlx::query_scalar(&count)
                .bind(&stream)
                .bind(&unit)
                .fetch_one(&self.inner.pool)
                .await
                .map_err(map_err)?;
            out.push(outbox_core::ParkedUnit {
                stream,
                unit,
                parked_at: outbox_core::from_millis(at),
                reason,
                head,
                pending: pending.max(0) as u64,
            });
        }
        Ok(out)
    }

    async fn messages(
        &self,
        f: &outbox_core::MessageFilter,
    ) -> outbox_core::Result<Vec<StoredMessage>> {
        f.validate()?;
        let (clause, values) = crate::common::filter_clause(f, |_, _| "?".to_owned());
        let sql = format!(
            "SELECT {COLS} FROM {} WHERE 1 = 1{clause} ORDER BY seq DESC LIMIT {}",
            self.inner.table, f.limit
        );
        let mut q = sqlx::query(&sql);
        for v in &values {
            q = match v {
                crate::common::FilterValue::Text(t) => q.bind(t),
                crate::common::FilterValue::Seq(n) => q.bind(n),
            };
        }
        let rows = q.fetch_all(&self.inner.pool).await.map_err(map_err)?;
        rows.iter().map(listed).collect()
    }

    async fn purge_dead(&self, sel: &Selector) -> outbox_core::Result<u64> {
        let (clause, vals) = selector(sel);
        let sql = format!(
            "DELETE FROM {} WHERE status = 'dead'{clause}",
            self.inner.table
        );
        Ok(sqlx_value::bind(sqlx::query(&sql), &vals)
            .execute(&self.inner.pool)
            .await
            .map_err(map_err)?
            .rows_affected())
    }

    async fn dead_letters(
        &self,
        stream: Option<&str>,
        limit: usize,
    ) -> outbox_core::Result<Vec<StoredMessage>> {
        let sql = format!(
            "SELECT {COLS} FROM {} WHERE status = 'dead' AND (? IS NULL OR stream = ?) ORDER BY created_at, seq LIMIT ?",
            self.inner.table
        );
        let rows = sqlx::query(&sql)
            .bind(stream)
            .bind(stream)
            .bind(limit as i64)
            .fetch_all(&self.inner.pool)
            .await
            .map_err(map_err)?;
        rows.iter().map(listed).collect()
    }

    async fn clean(
        &self,
        sent_before: SystemTime,
        limit: usize,
        include_dead: bool,
    ) -> outbox_core::Result<u64> {
        // MySQL cannot DELETE with a LIMITed subquery on the same table; DELETE ... LIMIT is fine.
        let dead = if include_dead {
            " OR (status = 'dead' AND created_at < ?)"
        } else {
            ""
        };
        let sql = format!(
            "DELETE FROM {} WHERE (status = 'sent' AND sent_at < ?){dead} ORDER BY seq LIMIT ?",
            self.inner.table
        );
        let before = to_millis(sent_before);
        let mut q = sqlx::query(&sql).bind(before);
        if include_dead {
            q = q.bind(before);
        }
        Ok(q.bind(limit as i64)
            .execute(&self.inner.pool)
            .await
            .map_err(map_err)?
            .rows_affected())
    }

    async fn stats(&self) -> outbox_core::Result<Stats> {
        let sql = format!(
            "SELECT CONVERT(stream USING utf8mb4), CAST(SUM(status = 'pending') AS SIGNED), CAST(SUM(status = 'sent') AS SIGNED),
               CAST(SUM(status = 'dead') AS SIGNED), MIN(CASE WHEN status = 'pending' THEN created_at END)
             FROM {} GROUP BY stream ORDER BY stream",
            self.inner.table
        );
        let rows: Vec<(String, i64, i64, i64, Option<i64>)> = sqlx::query_as(&sql)
            .fetch_all(&self.inner.pool)
            .await
            .map_err(map_err)?;
        Ok(stats_from_rows(rows))
    }

    async fn get(&self, seq: i64) -> outbox_core::Result<Option<StoredMessage>> {
        let sql = format!("SELECT {COLS} FROM {} WHERE seq = ?", self.inner.table);
        let row = sqlx::query(&sql)
            .bind(seq)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(map_err)?;
        row.as_ref().map(listed).transpose()
    }
}
