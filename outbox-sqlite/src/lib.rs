//! SQLite store for the `outbox` framework: the embedded default, no server needed.
//!
//! Messages are enqueued inside the caller's own [`rusqlite::Transaction`]; the relay uses a
//! connection of its own (WAL mode, busy timeout) and claims rows with a lease in one
//! `UPDATE … RETURNING` statement under `BEGIN IMMEDIATE`, so two relay processes on one
//! file never publish the same row twice while both live.
//!
//! ```no_run
//! use outbox_core::{Message, Outbox, StdoutPublisher};
//! use outbox_sqlite::SqliteStore;
//! # async fn demo() -> outbox_core::Result<()> {
//! let store = SqliteStore::open("app.db")?;          // table "outbox"
//! store.migrate_now()?;
//! let outbox = Outbox::builder(store.clone(), StdoutPublisher::default()).build()?;
//!
//! let mut conn = store.connect()?;                   // the application's connection
//! let tx = conn.transaction().map_err(outbox_sqlite::map_err)?;
//! tx.execute("CREATE TABLE IF NOT EXISTS orders (id INTEGER)", []).map_err(outbox_sqlite::map_err)?;
//! tx.execute("INSERT INTO orders (id) VALUES (1)", []).map_err(outbox_sqlite::map_err)?;
//! let pending = store.enqueue(&tx, &outbox, [Message::json("orders.placed", &1)?])?;
//! outbox_sqlite::commit(tx, pending)?;               // commit, then publish on commit
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use outbox_core::{
    async_trait, from_millis, to_millis, validate_identifier, Claim, Claimed, Envelope, Error,
    Failure, Message, MessageId, NewMessage, Outbox, Outcome, Pending, Quarantined, Retry,
    Selector, Stats, Store, StoredMessage, StreamFilter, StreamStats,
};
use rusqlite::{
    params, params_from_iter, Connection, OptionalExtension, Transaction, TransactionBehavior,
};
use tokio::sync::Notify;

/// Convert a rusqlite error: busy/locked and I/O errors are transient, constraint and
/// schema errors permanent.
pub fn map_err(e: rusqlite::Error) -> Error {
    use rusqlite::ErrorCode as C;
    let retry = match &e {
        rusqlite::Error::SqliteFailure(f, _) => match f.code {
            C::DatabaseBusy
            | C::DatabaseLocked
            | C::SystemIoFailure
            | C::OutOfMemory
            | C::CannotOpen => Retry::Transient,
            _ => Retry::Permanent,
        },
        _ => Retry::Permanent,
    };
    Error::new(outbox_core::ErrorKind::Store, retry, "sqlite").with_source(e)
}

/// Settings of a [`SqliteStore`].
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// Table name (validated). Default: `outbox`.
    pub table: String,
    /// How long a statement waits for another writer. Default: 5 s.
    pub busy_timeout: Duration,
    /// Create the database file when it does not exist, readable by its owner only (mode
    /// 0600 on Unix). With false, a missing file is a `Config` error (a mistyped path must not
    /// quietly become an empty database). Default: true.
    pub create: bool,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            table: "outbox".into(),
            busy_timeout: Duration::from_secs(5),
            create: true,
        }
    }
}

struct Shared {
    path: PathBuf,
    options: SqliteOptions,
    sql: Sql,
    conn: Mutex<Connection>,
    notify: Notify,
}

/// The SQLite outbox store. Cheap to clone; clones share one relay connection.
#[derive(Clone)]
pub struct SqliteStore {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.shared.path)
            .field("table", &self.shared.options.table)
            .finish()
    }
}

impl SqliteStore {
    /// Open (or create) the database file with the default table `outbox`.
    pub fn open(path: impl AsRef<Path>) -> outbox_core::Result<Self> {
        Self::open_with(path, SqliteOptions::default())
    }

    /// Open with options. The table name is validated before it reaches any SQL.
    pub fn open_with(path: impl AsRef<Path>, options: SqliteOptions) -> outbox_core::Result<Self> {
        validate_identifier(&options.table)?;
        let path = path.as_ref().to_path_buf();
        let conn = open_conn(&path, &options)?;
        let sql = Sql::new(&options.table);
        Ok(Self {
            shared: Arc::new(Shared {
                path,
                options,
                sql,
                conn: Mutex::new(conn),
                notify: Notify::new(),
            }),
        })
    }

    /// A second store on the same file and table with its own connection (as another process
    /// would have).
    pub fn reopen(&self) -> outbox_core::Result<Self> {
        Self::open_with(&self.shared.path, self.shared.options.clone())
    }

    /// A new connection for the application, with the same pragmas (WAL, busy timeout).
    pub fn connect(&self) -> outbox_core::Result<Connection> {
        open_conn(&self.shared.path, &self.shared.options)
    }

    /// The table name.
    pub fn table(&self) -> &str {
        &self.shared.options.table
    }

    /// Whether the outbox table exists (it does once [`Store::migrate`] ran).
    pub fn table_exists(&self) -> outbox_core::Result<bool> {
        let conn = self.shared.conn.lock().unwrap_or_else(|p| p.into_inner());
        conn.query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [self.table()],
            |r| r.get::<_, i64>(0),
        )
        .map(|n| n > 0)
        .map_err(map_err)
    }

    /// Create the table and indexes now (synchronous; [`Store::migrate`] does the same).
    pub fn migrate_now(&self) -> outbox_core::Result<()> {
        let conn = self.shared.conn.lock().unwrap();
        conn.execute_batch(&self.shared.sql.schema).map_err(map_err)
    }

    /// Write `messages` in the caller's transaction. Either all are written or, on error,
    /// none is. Returns what to publish after the commit: call [`commit`] or
    /// [`Pending::dispatch`] after `tx.commit()`.
    pub fn enqueue(
        &self,
        tx: &Transaction<'_>,
        outbox: &Outbox,
        messages: impl IntoIterator<Item = Message>,
    ) -> outbox_core::Result<Pending> {
        let prepared = outbox.prepare(messages)?;
        let seqs = insert_rows(tx, &self.shared.sql, prepared.rows())?;
        prepared.into_pending(seqs)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection, &Sql) -> outbox_core::Result<T> + Send + 'static,
    ) -> outbox_core::Result<T> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = shared.conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut conn, &shared.sql)
        })
        .await
        .map_err(|e| Error::store("sqlite worker task failed").with_source(e))?
    }
}

/// Commit `tx`, then publish its publish-on-commit messages in the background and wake local
/// relays. Nothing is published if the commit fails.
pub fn commit(tx: Transaction<'_>, pending: Pending) -> outbox_core::Result<()> {
    tx.commit().map_err(map_err)?;
    pending.dispatch();
    Ok(())
}

fn open_conn(path: &Path, options: &SqliteOptions) -> outbox_core::Result<Connection> {
    let on_disk = !(path.as_os_str() == ":memory:" || path.to_string_lossy().starts_with("file:"));
    if on_disk && !path.exists() {
        if !options.create {
            return Err(Error::config(format!(
                "no SQLite database at {}: run `outbox migrate` first, or check the path",
                path.display()
            )));
        }
        create_private(path).map_err(|e| {
            Error::new(
                outbox_core::ErrorKind::Store,
                Retry::Transient,
                format!("cannot create SQLite database {}", path.display()),
            )
            .with_source(e)
        })?;
    }
    let conn = Connection::open(path).map_err(|e| {
        Error::new(
            outbox_core::ErrorKind::Store,
            Retry::Transient,
            format!("cannot open SQLite database {}", path.display()),
        )
        .with_source(e)
    })?;
    conn.busy_timeout(options.busy_timeout).map_err(map_err)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(map_err)?;
    Ok(conn)
}

/// Create an empty database file readable by its owner only (SQLite gives its -wal and -shm
/// files the same mode).
fn create_private(path: &Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

const COLS: &str =
    "seq, id, stream, destination, msg_key, payload, content_type, headers, strategy, status, \
                    attempts, created_at, next_attempt_at, last_error, sent_at, signature, okey";

struct Sql {
    schema: String,
    insert: String,
    claim_head: String,
    complete_mark: String,
    complete_delete: String,
    retry: String,
    dead: String,
    release: String,
    get: String,
    table: String,
}

impl Sql {
    fn new(t: &str) -> Self {
        Self {
            schema: format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                    seq INTEGER PRIMARY KEY AUTOINCREMENT,
                    id TEXT NOT NULL UNIQUE,
                    stream TEXT NOT NULL,
                    destination TEXT NOT NULL,
                    msg_key TEXT,
                    okey TEXT NOT NULL,
                    payload BLOB NOT NULL,
                    content_type TEXT NOT NULL,
                    headers TEXT NOT NULL,
                    strategy TEXT NOT NULL,
                    status TEXT NOT NULL,
                    attempts INTEGER NOT NULL DEFAULT 0,
                    created_at INTEGER NOT NULL,
                    next_attempt_at INTEGER NOT NULL,
                    locked_by TEXT,
                    locked_until INTEGER,
                    last_error TEXT,
                    sent_at INTEGER,
                    signature TEXT
                );
                CREATE INDEX IF NOT EXISTS {t}_unit ON {t} (stream, okey, seq) WHERE status = 'pending';
                CREATE INDEX IF NOT EXISTS {t}_leased ON {t} (locked_until) WHERE status = 'pending' AND locked_until IS NOT NULL;
                CREATE INDEX IF NOT EXISTS {t}_backoff ON {t} (next_attempt_at) WHERE status = 'pending' AND attempts > 0;
                CREATE INDEX IF NOT EXISTS {t}_sent ON {t} (sent_at) WHERE status = 'sent';
                CREATE INDEX IF NOT EXISTS {t}_dead ON {t} (created_at) WHERE status = 'dead';"
            ),
            insert: format!(
                "INSERT INTO {t} (id, stream, destination, msg_key, okey, payload, content_type, headers, strategy,
                    status, attempts, created_at, next_attempt_at, locked_by, locked_until, last_error, signature)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)"
            ),
            // A keep-order row is claimable only when no earlier pending row of its unit is
            // leased or backing off; ordering by seq with a limit keeps each unit a prefix.
            // Each unit's first blocked (leased or backing-off) seq, then free, due rows in
            // seq order before it; ordering by seq with a limit keeps each unit a prefix.
            // The byte budget (?6), in seq order so each unit stays a prefix: sizes are read
            // first (octet_length does not load a BLOB), oversized rows (?5) cost nothing and
            // come back without their payload, the first other row always fits.
            claim_head: format!(
                "WITH blocked AS MATERIALIZED (
                   SELECT b.stream, b.okey, MIN(b.seq) AS seq FROM {t} b
                   WHERE b.status = 'pending' AND b.strategy = 'keep_order'
                     AND ((b.locked_until IS NOT NULL AND b.locked_until > ?3) OR (b.attempts > 0 AND b.next_attempt_at > ?3))
                   GROUP BY b.stream, b.okey)
                 UPDATE {t} SET locked_by = ?1, locked_until = ?2 WHERE seq IN (
                   SELECT seq FROM (
                     SELECT seq, size, SUM(CASE WHEN size > ?5 THEN 0 ELSE size END) OVER (ORDER BY seq) AS running
                     FROM (
                       SELECT o.seq, octet_length(o.payload) + octet_length(o.headers) AS size FROM {t} o
                       WHERE o.status = 'pending' {{filter}}
                         AND (o.locked_until IS NULL OR o.locked_until <= ?3) AND o.next_attempt_at <= ?3
                         AND (o.strategy = 'on_commit' OR NOT EXISTS (
                           SELECT 1 FROM blocked WHERE blocked.stream = o.stream AND blocked.okey = o.okey
                             AND blocked.seq < o.seq))
                       ORDER BY o.seq LIMIT ?4))
                   WHERE running - CASE WHEN size > ?5 THEN 0 ELSE size END = 0 OR running <= ?6)
                 RETURNING {cols}, octet_length(payload) + octet_length(headers)",
                cols = COLS.replacen(
                    "payload,",
                    "CASE WHEN octet_length(payload) + octet_length(headers) > ?5 THEN NULL ELSE payload END,",
                    1
                )
            ),
            complete_mark: format!(
                "UPDATE {t} SET status = 'sent', sent_at = ?1, locked_by = NULL, locked_until = NULL WHERE seq IN ({{in}})"
            ),
            complete_delete: format!("DELETE FROM {t} WHERE seq IN ({{in}})"),
            retry: format!(
                "UPDATE {t} SET attempts = attempts + 1, last_error = ?1, next_attempt_at = ?2, locked_by = NULL,
                   locked_until = NULL WHERE seq = ?3 AND locked_by = ?4 AND status = 'pending'"
            ),
            dead: format!(
                "UPDATE {t} SET attempts = attempts + 1, last_error = ?1, status = 'dead', locked_by = NULL,
                   locked_until = NULL WHERE seq = ?2 AND locked_by = ?3 AND status = 'pending'"
            ),
            release: format!(
                "UPDATE {t} SET locked_by = NULL, locked_until = NULL WHERE seq = ?1 AND locked_by = ?2 AND status = 'pending'"
            ),
            get: format!("SELECT {COLS} FROM {t} WHERE seq = ?1"),
            table: t.to_owned(),
        }
    }
}

fn insert_rows(conn: &Connection, sql: &Sql, rows: &[NewMessage]) -> outbox_core::Result<Vec<i64>> {
    let now = SystemTime::now();
    let mut stmt = conn.prepare_cached(&sql.insert).map_err(map_err)?;
    let mut seqs = Vec::with_capacity(rows.len());
    for r in rows {
        let m = &r.envelope.message;
        let headers = serde_json::to_string(&m.headers)?;
        let (locked_by, locked_until) = match &r.lease {
            Some((owner, d)) => (Some(owner.as_str()), Some(to_millis(now + *d))),
            None => (None, None),
        };
        stmt.execute(params![
            r.envelope.id.to_string(),
            m.stream,
            m.destination,
            m.key,
            m.key.as_deref().unwrap_or(""),
            m.payload,
            m.content_type,
            headers,
            r.strategy.as_str(),
            r.status.as_str(),
            r.attempts,
            to_millis(r.envelope.created_at),
            to_millis(now + r.retry_after),
            locked_by,
            locked_until,
            r.last_error,
            r.signature,
        ])
        .map_err(map_err)?;
        seqs.push(conn.last_insert_rowid());
    }
    Ok(seqs)
}

/// Decode one row; the error names the column that does not decode. Rows are input: another
/// service, an operator or an attacker may have written them.
fn decode(row: &rusqlite::Row<'_>) -> Result<StoredMessage, String> {
    use rusqlite::types::{FromSql, ValueRef};
    fn col<T: FromSql>(row: &rusqlite::Row<'_>, i: usize, name: &str) -> Result<T, String> {
        row.get(i).map_err(|e| format!("column {name}: {e}"))
    }
    let id: String = col(row, 1, "id")?;
    let headers: String = col(row, 7, "headers")?;
    let headers: BTreeMap<String, String> = serde_json::from_str(&headers)
        .map_err(|e| format!("column headers: not a JSON object of strings: {e}"))?;
    let strategy: String = col(row, 8, "strategy")?;
    let status: String = col(row, 9, "status")?;
    // The payload is bytes: a BLOB, or TEXT written by hand.
    let payload = match row.get_ref(5).map_err(|e| format!("column payload: {e}"))? {
        ValueRef::Blob(b) | ValueRef::Text(b) => b.to_vec(),
        other => {
            return Err(format!(
                "column payload: {:?} is not bytes",
                other.data_type()
            ))
        }
    };
    let key: Option<String> = col(row, 4, "msg_key")?;
    let okey: String = col(row, 16, "okey")?;
    if okey != key.as_deref().unwrap_or("") {
        return Err(format!(
            "column okey: {okey:?} is not the row's key: the row was moved to another ordering unit"
        ));
    }
    Ok(StoredMessage {
        seq: col(row, 0, "seq")?,
        envelope: Envelope {
            id: id
                .parse::<MessageId>()
                .map_err(|_| format!("column id: {id:?} is not a UUID"))?,
            created_at: from_millis(col(row, 11, "created_at")?),
            message: Message {
                stream: col(row, 2, "stream")?,
                destination: col(row, 3, "destination")?,
                key,
                payload,
                content_type: col(row, 6, "content_type")?,
                headers,
            },
        },
        strategy: strategy
            .parse()
            .map_err(|_| format!("column strategy: unknown strategy {strategy:?}"))?,
        status: status
            .parse()
            .map_err(|_| format!("column status: unknown status {status:?}"))?,
        attempts: col(row, 10, "attempts")?,
        next_attempt_at: from_millis(col(row, 12, "next_attempt_at")?),
        last_error: col(row, 13, "last_error")?,
        sent_at: col::<Option<i64>>(row, 14, "sent_at")?.map(from_millis),
        signature: col(row, 15, "signature")?,
    })
}

/// A claimed row: decoded, or quarantined with the reason (without its payload, which the
/// claim did not load, when it is over the row limit; its size follows the columns).
fn claimed_row(row: &rusqlite::Row<'_>, claim: &Claim) -> rusqlite::Result<Claimed> {
    let seq: i64 = row.get(0)?; // INTEGER PRIMARY KEY: always an integer
    let id = || row.get::<_, String>(1).ok();
    if let Ok(rusqlite::types::ValueRef::Null) = row.get_ref(5) {
        let size: i64 = row.get(17).unwrap_or(-1);
        return Ok(Err(Quarantined {
            seq,
            id: id(),
            reason: claim.oversized(size.max(0) as usize),
        }));
    }
    Ok(decode(row).map_err(|reason| Quarantined {
        seq,
        id: id(),
        reason,
    }))
}

/// A row for listings: decoded, or a placeholder that keeps its status and error.
fn listed_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredMessage> {
    let seq: i64 = row.get(0)?;
    Ok(decode(row).unwrap_or_else(|why| {
        let status = row.get::<_, String>(9).ok().and_then(|s| s.parse().ok());
        StoredMessage::unreadable(seq, status, row.get(13).ok().flatten(), &why)
    }))
}

fn placeholders(n: usize, first: usize) -> String {
    (first..first + n)
        .map(|i| format!("?{i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn selector_clause(sel: &Selector) -> (String, Vec<rusqlite::types::Value>) {
    use rusqlite::types::Value;
    match sel {
        Selector::All => (String::new(), vec![]),
        Selector::Stream(s) => (" AND stream = ?1".into(), vec![Value::Text(s.clone())]),
        Selector::Seqs(seqs) => (
            format!(" AND seq IN ({})", placeholders(seqs.len().max(1), 1)),
            if seqs.is_empty() {
                vec![Value::Null]
            } else {
                seqs.iter().map(|s| Value::Integer(*s)).collect()
            },
        ),
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn signing_scope(&self) -> String {
        self.shared.options.table.clone()
    }

    async fn migrate(&self) -> outbox_core::Result<()> {
        self.blocking(|conn, sql| conn.execute_batch(&sql.schema).map_err(map_err))
            .await
    }

    async fn insert(&self, rows: &[NewMessage]) -> outbox_core::Result<Vec<i64>> {
        let rows = rows.to_vec();
        self.blocking(move |conn, sql| {
            let tx = conn.transaction().map_err(map_err)?;
            let seqs = insert_rows(&tx, sql, &rows)?;
            tx.commit().map_err(map_err)?;
            Ok(seqs)
        })
        .await
    }

    async fn claim(&self, claim: &Claim) -> outbox_core::Result<Vec<Claimed>> {
        let claim = claim.clone();
        self.blocking(move |conn, sql| {
            use rusqlite::types::Value;
            let now = to_millis(SystemTime::now());
            let mut args: Vec<Value> = vec![
                Value::Text(claim.owner.clone()),
                Value::Integer(now + claim.lease.as_millis() as i64),
                Value::Integer(now),
                Value::Integer(claim.limit as i64),
                Value::Integer(claim.max_row_bytes as i64),
                Value::Integer(claim.max_batch_bytes.min(i64::MAX as usize) as i64),
            ];
            let filter = match &claim.streams {
                StreamFilter::All => String::new(),
                StreamFilter::Only(streams) => {
                    let list = placeholders(streams.len(), 7);
                    args.extend(streams.iter().map(|s| Value::Text(s.clone())));
                    format!("AND o.stream IN ({list})")
                }
            };
            let text = sql.claim_head.replace("{filter}", &filter);
            // IMMEDIATE: take the write lock first, so two relays never read the same rows.
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(map_err)?;
            let mut rows = {
                let mut stmt = tx.prepare_cached(&text).map_err(map_err)?;
                let rows = stmt
                    .query_map(params_from_iter(args), |row| claimed_row(row, &claim))
                    .map_err(map_err)?;
                rows.collect::<Result<Vec<_>, _>>().map_err(map_err)?
            };
            tx.commit().map_err(map_err)?;
            rows.sort_by_key(|r| match r {
                Ok(m) => m.seq,
                Err(q) => q.seq,
            });
            Ok(rows)
        })
        .await
    }

    async fn complete(&self, seqs: &[i64], delete: bool) -> outbox_core::Result<()> {
        let seqs = seqs.to_vec();
        self.blocking(move |conn, sql| {
            let tx = conn.transaction().map_err(map_err)?;
            let now = to_millis(SystemTime::now());
            for chunk in seqs.chunks(500) {
                if delete {
                    let text = sql
                        .complete_delete
                        .replace("{in}", &placeholders(chunk.len(), 1));
                    tx.prepare_cached(&text)
                        .and_then(|mut s| s.execute(params_from_iter(chunk)))
                        .map_err(map_err)?;
                } else {
                    let text = sql
                        .complete_mark
                        .replace("{in}", &placeholders(chunk.len(), 2));
                    let args = std::iter::once(now).chain(chunk.iter().copied());
                    tx.prepare_cached(&text)
                        .and_then(|mut s| s.execute(params_from_iter(args)))
                        .map_err(map_err)?;
                }
            }
            tx.commit().map_err(map_err)
        })
        .await
    }

    async fn fail(&self, owner: &str, failures: &[Failure]) -> outbox_core::Result<()> {
        let owner = owner.to_owned();
        let failures = failures.to_vec();
        self.blocking(move |conn, sql| {
            let tx = conn.transaction().map_err(map_err)?;
            let now = SystemTime::now();
            for f in &failures {
                let r = match &f.outcome {
                    Outcome::Retry { after } => tx.prepare_cached(&sql.retry).and_then(|mut s| {
                        s.execute(params![f.error, to_millis(now + *after), f.seq, owner])
                    }),
                    Outcome::Dead => tx
                        .prepare_cached(&sql.dead)
                        .and_then(|mut s| s.execute(params![f.error, f.seq, owner])),
                    Outcome::Release => tx
                        .prepare_cached(&sql.release)
                        .and_then(|mut s| s.execute(params![f.seq, owner])),
                };
                r.map_err(map_err)?;
            }
            tx.commit().map_err(map_err)
        })
        .await
    }

    async fn requeue(&self, selector: &Selector) -> outbox_core::Result<u64> {
        let (clause, mut args) = selector_clause(selector);
        let n = self
            .blocking(move |conn, sql| {
                let now_idx = args.len() + 1;
                args.push(rusqlite::types::Value::Integer(to_millis(SystemTime::now())));
                let text = format!(
                    "UPDATE {} SET status = 'pending', attempts = 0, next_attempt_at = ?{now_idx}, locked_by = NULL,
                       locked_until = NULL WHERE status = 'dead'{clause}",
                    sql.table
                );
                conn.execute(&text, params_from_iter(args)).map(|n| n as u64).map_err(map_err)
            })
            .await?;
        self.shared.notify.notify_one();
        Ok(n)
    }

    async fn purge_dead(&self, selector: &Selector) -> outbox_core::Result<u64> {
        let (clause, args) = selector_clause(selector);
        self.blocking(move |conn, sql| {
            let text = format!("DELETE FROM {} WHERE status = 'dead'{clause}", sql.table);
            conn.execute(&text, params_from_iter(args))
                .map(|n| n as u64)
                .map_err(map_err)
        })
        .await
    }

    async fn dead_letters(
        &self,
        stream: Option<&str>,
        limit: usize,
    ) -> outbox_core::Result<Vec<StoredMessage>> {
        let stream = stream.map(str::to_owned);
        self.blocking(move |conn, sql| {
            let text = format!(
                "SELECT {COLS} FROM {} WHERE status = 'dead' AND (?1 IS NULL OR stream = ?1) ORDER BY seq LIMIT ?2",
                sql.table
            );
            let mut stmt = conn.prepare_cached(&text).map_err(map_err)?;
            let rows = stmt.query_map(params![stream, limit as i64], listed_row).map_err(map_err)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(map_err)
        })
        .await
    }

    async fn clean(
        &self,
        sent_before: SystemTime,
        limit: usize,
        include_dead: bool,
    ) -> outbox_core::Result<u64> {
        self.blocking(move |conn, sql| {
            let text = format!(
                "DELETE FROM {t} WHERE seq IN (SELECT seq FROM {t} WHERE (status = 'sent' AND sent_at < ?1)
                   OR (?2 AND status = 'dead' AND created_at < ?1) ORDER BY seq LIMIT ?3)",
                t = sql.table
            );
            conn.execute(&text, params![to_millis(sent_before), include_dead, limit as i64])
                .map(|n| n as u64)
                .map_err(map_err)
        })
        .await
    }

    async fn stats(&self) -> outbox_core::Result<Stats> {
        self.blocking(|conn, sql| {
            let text = format!(
                "SELECT stream, SUM(status = 'pending'), SUM(status = 'sent'), SUM(status = 'dead'),
                   MIN(CASE WHEN status = 'pending' THEN created_at END)
                 FROM {} GROUP BY stream ORDER BY stream",
                sql.table
            );
            let mut stmt = conn.prepare_cached(&text).map_err(map_err)?;
            let rows = stmt
                .query_map([], |r| {
                    // A name written around the outbox may be a BLOB or not UTF-8.
                    let stream = match r.get_ref(0)? {
                        rusqlite::types::ValueRef::Text(b) | rusqlite::types::ValueRef::Blob(b) => {
                            String::from_utf8_lossy(b).into_owned()
                        }
                        other => format!("<{:?}>", other.data_type()),
                    };
                    Ok(StreamStats {
                        stream,
                        pending: r.get::<_, i64>(1)? as u64,
                        sent: r.get::<_, i64>(2)? as u64,
                        dead: r.get::<_, i64>(3)? as u64,
                        oldest_pending: r.get::<_, Option<i64>>(4)?.map(from_millis),
                    })
                })
                .map_err(map_err)?;
            Ok(Stats {
                streams: rows.collect::<Result<Vec<_>, _>>().map_err(map_err)?,
            })
        })
        .await
    }

    async fn get(&self, seq: i64) -> outbox_core::Result<Option<StoredMessage>> {
        self.blocking(move |conn, sql| {
            conn.prepare_cached(&sql.get)
                .and_then(|mut s| s.query_row([seq], listed_row).optional())
                .map_err(map_err)
        })
        .await
    }

    async fn wait_for_work(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.shared.notify.notified()).await;
    }

    fn notify_committed(&self) {
        self.shared.notify.notify_one();
    }
}
