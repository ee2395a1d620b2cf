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
//! let mut tx = conn.transaction().map_err(outbox_sqlite::map_err)?;
//! tx.execute("CREATE TABLE IF NOT EXISTS orders (id INTEGER)", []).map_err(outbox_sqlite::map_err)?;
//! tx.execute("INSERT INTO orders (id) VALUES (1)", []).map_err(outbox_sqlite::map_err)?;
//! let after = outbox.enqueue_blocking(&mut tx, [Message::json("orders.placed", &1)?])?;
//! outbox_sqlite::commit(tx, after)?;                 // commit, then publish on commit
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod admin;
mod claim;
mod settle;
mod sql;

use sql::Sql;
mod inbox;
pub use inbox::{InboxTable, SqliteHandler, SqliteInbox, MAX_CONSUMER_NAME};
use outbox_core::StoreAdmin;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use outbox_core::{
    async_trait, from_millis, to_millis, validate_identifier, AfterCommit, Claim, Claimed,
    EnqueueBlocking, Envelope, Error, Exhausted, Failure, Message, MessageId, NewMessage, Outcome,
    Quarantined, Retry, Selector, Stats, Store, StoredMessage, StreamFilter, StreamStats,
};
use rusqlite::{
    params, params_from_iter, Connection, OptionalExtension, Transaction, TransactionBehavior,
};
use tokio::sync::Notify;

/// The rusqlite this store is built with, for the application's own connections and
/// transactions.
pub use rusqlite;

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
    /// When orphaned units were last looked for (see `Sql::adopt`).
    adopted: Mutex<Option<std::time::Instant>>,
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

/// A path, or the `sqlite://PATH` / `sqlite:PATH` URL the `outbox` command takes.
fn path_of(path: &Path) -> outbox_core::Result<std::path::PathBuf> {
    let Some(text) = path.to_str() else {
        return Ok(path.to_path_buf());
    };
    match text.strip_prefix("sqlite:") {
        Some(rest) => {
            let rest = rest.strip_prefix("//").unwrap_or(rest);
            if rest.is_empty() {
                return Err(Error::config(
                    "sqlite URL needs a path: sqlite://path/to/file.db",
                ));
            }
            Ok(std::path::PathBuf::from(rest))
        }
        None => Ok(path.to_path_buf()),
    }
}

impl SqliteStore {
    /// Open (or create) the database file with the default table `outbox`: a path, or a
    /// `sqlite://PATH` URL as the `outbox` command takes.
    pub fn open(path: impl AsRef<Path>) -> outbox_core::Result<Self> {
        Self::open_with(path, SqliteOptions::default())
    }

    /// Open with options. The table name is validated before it reaches any SQL.
    pub fn open_with(path: impl AsRef<Path>, options: SqliteOptions) -> outbox_core::Result<Self> {
        validate_identifier(&options.table)?;
        let path = path_of(path.as_ref())?;
        let conn = open_conn(&path, &options)?;
        let sql = Sql::new(&options.table);
        Ok(Self {
            shared: Arc::new(Shared {
                adopted: Mutex::new(None),
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
        table_exists_on(&conn, self.table())
    }

    /// Create the table and indexes now (synchronous; [`Store::migrate`] does the same).
    pub fn migrate_now(&self) -> outbox_core::Result<()> {
        let conn = self.shared.conn.lock().unwrap();
        conn.execute_batch(&self.shared.sql.schema).map_err(map_err)
    }

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
        let owner = owner.map(str::to_owned);
        let done = done.to_vec();
        let failures = failures.to_vec();
        self.blocking(move |conn, sql| {
            settle::settle_rows(conn, sql, owner.as_deref(), &done, delete, &failures)
        })
        .await
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

/// Rows are written in the caller's transaction; either all are written or, on error, none.
impl<'c> EnqueueBlocking<Transaction<'c>> for SqliteStore {
    fn write_rows_blocking(
        &self,
        tx: &mut Transaction<'c>,
        rows: &[NewMessage],
        _need_seqs: bool,
    ) -> outbox_core::Result<Vec<i64>> {
        insert_rows(tx, &self.shared.sql, rows)
    }
}

impl SqliteStore {
    /// Write `rows` on `conn`, inside a transaction its caller manages (`BEGIN IMMEDIATE` …
    /// `COMMIT` on a connection from [`connect`](Self::connect)): for wrappers that own their
    /// connection, as `outbox::any::AnyTransaction` does. Everyone else enqueues through
    /// `Outbox::enqueue_blocking` on a `rusqlite::Transaction`. A connection outside a
    /// transaction is refused: each row would commit on its own.
    pub fn write_rows_in(
        &self,
        conn: &Connection,
        rows: &[NewMessage],
    ) -> outbox_core::Result<Vec<i64>> {
        if conn.is_autocommit() {
            return Err(Error::config(
                "SqliteStore::write_rows_in needs a connection inside a transaction (BEGIN first)",
            ));
        }
        insert_rows(conn, &self.shared.sql, rows)
    }
}

/// Commit `tx`, then publish its publish-on-commit messages in the background and wake local
/// relays. Nothing is published if the commit fails.
pub fn commit(tx: Transaction<'_>, after: AfterCommit) -> outbox_core::Result<()> {
    tx.commit().map_err(map_err)?;
    after.dispatch();
    Ok(())
}

/// Whether `conn`'s database has the table `table`.
fn table_exists_on(conn: &Connection, table: &str) -> outbox_core::Result<bool> {
    conn.query_row(
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
        [table],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n > 0)
    .map_err(map_err)
}

fn open_conn(path: &Path, options: &SqliteOptions) -> outbox_core::Result<Connection> {
    let on_disk = !(path.as_os_str() == ":memory:" || path.to_string_lossy().starts_with("file:"));
    if on_disk && !path.exists() && path.symlink_metadata().is_ok() {
        // A link to nothing: SQLite would create its target, where the link points, with
        // the default permissions.
        return Err(Error::config(format!(
            "the SQLite database {} is a symbolic link to a file that does not exist: create the file (mode 0600) or fix the link",
            path.display()
        )));
    }
    #[cfg(unix)]
    if on_disk {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(path) {
            if m.permissions().mode() & 0o004 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    "the SQLite database is readable by every user of this machine (payloads included): chmod 600 it"
                );
            }
        }
    }
    if on_disk && !path.exists() {
        if let Some(folder) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            if !folder.is_dir() {
                return Err(Error::config(format!(
                    "cannot open the SQLite database {}: the folder {} does not exist",
                    path.display(),
                    folder.display()
                )));
            }
        }
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
    // Turning a new file to WAL takes an exclusive lock, and SQLite answers "database is
    // locked" at once, without its busy handler, to a connection that tries while another
    // does (several processes opening a new file at once): tried again within busy_timeout.
    let deadline = std::time::Instant::now() + options.busy_timeout;
    loop {
        match conn.pragma_update(None, "journal_mode", "WAL") {
            Ok(()) => return Ok(conn),
            Err(rusqlite::Error::SqliteFailure(f, _))
                if matches!(
                    f.code,
                    rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                ) && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => return Err(map_err(e)),
        }
    }
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

/// The columns a row is read back from; `payload` is the payload's expression (the column, or
/// one that leaves an oversized payload unread).
fn cols(payload: &str) -> String {
    format!(
        "seq, id, stream, destination, msg_key, {payload}, content_type, headers, strategy, status, \
         attempts, created_at, next_attempt_at, last_error, sent_at, signature, okey, on_exhausted"
    )
}

/// Schema step 1: the tables, indexes and columns of 0.1, made or brought up to date from
/// any shape an earlier build made, losing no row. Idempotent.
fn step_one(conn: &mut Connection, sql: &Sql) -> outbox_core::Result<()> {
    // Columns added after a table's first version (the schema's CREATE TABLE has them),
    // under the write lock so that two processes migrating at once do not both add it.
    let t = &sql.table;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(map_err)?;
    let missing = |table: &str, column: &str| -> outbox_core::Result<bool> {
        let exists: bool = tx
            .query_row(
                "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = ?1",
                [table],
                |r| r.get(0),
            )
            .map_err(map_err)?;
        let has: bool = tx
            .query_row(
                "SELECT count(*) > 0 FROM pragma_table_info(?1) WHERE name = ?2",
                [table, column],
                |r| r.get(0),
            )
            .map_err(map_err)?;
        Ok(exists && !has)
    };
    let due = format!("{t}_due");
    for (table, column, ddl) in [
        (t.as_str(), "on_exhausted", "on_exhausted TEXT"),
        (due.as_str(), "parked_at", "parked_at INTEGER"),
        (due.as_str(), "parked_reason", "parked_reason TEXT"),
        (t.as_str(), "claims", "claims INTEGER NOT NULL DEFAULT 0"),
        (due.as_str(), "claims", "claims INTEGER NOT NULL DEFAULT 0"),
    ] {
        if missing(table, column)? {
            tx.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {ddl}"))
                .map_err(map_err)?;
        }
    }
    tx.commit().map_err(map_err)?;
    conn.execute_batch(&sql.schema).map_err(map_err)
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
            r.unit,
            m.payload,
            m.content_type,
            headers,
            r.order.as_str(),
            r.status.as_str(),
            r.attempts,
            to_millis(r.envelope.created_at),
            to_millis(
                r.not_before
                    .map_or(now + r.retry_after, |t| t.max(now + r.retry_after))
            ),
            locked_by,
            locked_until,
            r.last_error,
            r.signature,
            r.exhausted.as_stored(),
        ])
        .map_err(map_err)?;
        seqs.push(conn.last_insert_rowid());
    }
    // Keep-order units become known to claims (writers are serialized by SQLite's write
    // lock, so a unit's row is never forgotten while a writer adds to it).
    let mut unit = conn
        .prepare_cached(&format!(
            "INSERT OR IGNORE INTO {}_due (stream, okey, next_at) VALUES (?1, ?2, ?3)",
            sql.table
        ))
        .map_err(map_err)?;
    let mut units: Vec<(&str, &str)> = rows
        .iter()
        .filter(|r| r.order == outbox_core::Order::InUnit)
        .map(|r| (r.envelope.message.stream.as_str(), r.unit.as_str()))
        .collect();
    units.sort_unstable();
    units.dedup();
    for (stream, key) in units {
        unit.execute(params![stream, key, to_millis(now)])
            .map_err(map_err)?;
    }
    Ok(seqs)
}

use outbox_core::PARKED_NEXT_AT as PARKED;

/// Un-park (`stream`, `unit`): due now, and its rows that failed get a fresh retry budget.
fn resume(tx: &Connection, t: &str, stream: &str, unit: &str) -> outbox_core::Result<()> {
    let now = to_millis(SystemTime::now());
    let n = tx
        .execute(
            &format!(
                "UPDATE {t}_due SET parked_at = NULL, parked_reason = NULL, next_at = ?3, leased_by = NULL,
                   claims = 0
                 WHERE stream = ?1 AND okey = ?2 AND parked_at IS NOT NULL"
            ),
            params![stream, unit, now],
        )
        .map_err(map_err)?;
    if n == 0 {
        return Err(outbox_core::no_such_unit(stream, unit, true));
    }
    tx.execute(
        &format!(
            "UPDATE {t} SET attempts = 0, next_attempt_at = MIN(next_attempt_at, ?3)
             WHERE status = 'pending' AND stream = ?1 AND okey = ?2 AND strategy <> 'on_commit' AND attempts > 0"
        ),
        params![stream, unit, now],
    )
    .map_err(map_err)?;
    Ok(())
}

/// How often a store looks for keep-order rows whose unit it does not know.
const ADOPT_EVERY: Duration = Duration::from_secs(60);

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
    let unit: String = col(row, 16, "okey")?;
    let exhausted: Option<String> = col(row, 17, "on_exhausted")?;
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
                schedule: None,
            },
        },
        order: strategy
            .parse()
            .map_err(|_| format!("column strategy: unknown strategy {strategy:?}"))?,
        unit,
        exhausted: Exhausted::from_stored(exhausted.as_deref())
            .map_err(|e| format!("column on_exhausted: {e}"))?,
        status: status
            .parse()
            .map_err(|_| format!("column status: unknown status {status:?}"))?,
        attempts: col(row, 10, "attempts")?,
        next_attempt_at: from_millis(col(row, 12, "next_attempt_at")?),
        last_error: col(row, 13, "last_error")?,
        sent_at: col::<Option<i64>>(row, 14, "sent_at")?.map(from_millis),
        signature: col(row, 15, "signature")?,
        claims: 0,
    })
}

/// A claimed row: decoded, or quarantined with the reason (without its payload, which the
/// claim did not load, when it is over the row limit; its size follows the columns).
fn claimed_row(row: &rusqlite::Row<'_>, claim: &Claim) -> rusqlite::Result<Claimed> {
    let seq: i64 = row.get(0)?; // INTEGER PRIMARY KEY: always an integer
    let id = || row.get::<_, String>(1).ok();
    if let Ok(rusqlite::types::ValueRef::Null) = row.get_ref(5) {
        let size: i64 = row.get(18).unwrap_or(-1);
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
        self.blocking(|conn, sql| {
            let t = &sql.table;
            conn.execute_batch(&sql::versions(t)).map_err(map_err)?;
            let found: Option<i64> = conn
                .query_row(&format!("SELECT max(version) FROM {t}_schema"), [], |r| {
                    r.get(0)
                })
                .map_err(map_err)?;
            // A table dropped since (by hand): every step again (each is idempotent), or the
            // recorded version would leave it missing.
            let exists = table_exists_on(conn, t)?;
            let found = found
                .filter(|_| exists)
                .map(|v| v.clamp(0, u32::MAX as i64) as u32);
            for step in outbox_core::SchemaStep::after(t, found)? {
                match step.version {
                    1 => step_one(conn, sql)?,
                    v => {
                        return Err(Error::config(format!(
                            "schema step {v} has no SQLite statements in this build"
                        )))
                    }
                }
                conn.execute(
                    &sql::record_version(t, &step),
                    [to_millis(SystemTime::now())],
                )
                .map_err(map_err)?;
                tracing::info!(table = %t, version = step.version, step = step.name, "schema step applied");
            }
            Ok(())
        })
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
        let adopt = {
            let mut last = self
                .shared
                .adopted
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let due = last.is_none_or(|t| t.elapsed() >= ADOPT_EVERY);
            if due {
                *last = Some(std::time::Instant::now());
            }
            due
        };
        self.blocking(move |conn, sql| claim::claim_rows(conn, sql, &claim, adopt))
            .await
    }

    async fn complete(&self, seqs: &[i64], delete: bool) -> outbox_core::Result<()> {
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
        let (stream, unit, reason) = (stream.to_owned(), unit.to_owned(), reason.to_owned());
        self.blocking(move |conn, sql| {
            let t = &sql.table;
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(map_err)?;
            let pending = format!(
                "EXISTS (SELECT 1 FROM {t} WHERE status = 'pending' AND stream = ?1 AND okey = ?2
                   AND strategy <> 'on_commit')"
            );
            // A unit the claims do not know yet (rows written by SQL) is adopted first.
            tx.execute(
                &format!(
                    "INSERT OR IGNORE INTO {t}_due (stream, okey, next_at) SELECT ?1, ?2, 0 WHERE {pending}"
                ),
                params![stream, unit],
            )
            .map_err(map_err)?;
            let parked = tx
                .execute(
                    &format!(
                        "UPDATE {t}_due SET parked_at = ?3, parked_reason = ?4, next_at = {PARKED}
                         WHERE stream = ?1 AND okey = ?2 AND parked_at IS NULL AND {pending}"
                    ),
                    params![stream, unit, to_millis(SystemTime::now()), reason],
                )
                .map_err(map_err)?;
            let already: bool = tx
                .query_row(
                    &format!(
                        "SELECT count(*) > 0 FROM {t}_due WHERE stream = ?1 AND okey = ?2 AND parked_at IS NOT NULL"
                    ),
                    params![stream, unit],
                    |r| r.get(0),
                )
                .map_err(map_err)?;
            if parked == 0 && !already {
                return Err(outbox_core::no_such_unit(&stream, &unit, false));
            }
            tx.commit().map_err(map_err)
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

#[cfg(test)]
mod url_tests {
    use super::*;

    #[test]
    fn paths_and_urls() {
        let p = |s: &str| path_of(Path::new(s)).map(|p| p.display().to_string());
        assert_eq!(p("app.db").unwrap(), "app.db");
        assert_eq!(p("sqlite://data/app.db").unwrap(), "data/app.db");
        assert_eq!(p("sqlite:///var/lib/app.db").unwrap(), "/var/lib/app.db");
        assert_eq!(p("sqlite:app.db").unwrap(), "app.db");
        assert!(p("sqlite://").is_err());
    }
}
