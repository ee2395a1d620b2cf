//! A store chosen at run time: [`AnyStore`] holds a SQLite, PostgreSQL or MySQL/MariaDB
//! store, picked by the URL's scheme, and its [`AnyTransaction`] enqueues on whichever
//! database it holds, as sqlx's `Any` driver does for queries.
//!
//! ```no_run
//! use outbox_core::{Message, Outbox, StdoutPublisher, Store};
//! use outbox_sql::any::{AnyStore, AnyValue};
//! # async fn run() -> outbox_core::Result<()> {
//! // sqlite://app.db, postgres://app@db/shop or mysql://app@db/shop, from configuration:
//! let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| "sqlite://app.db".into());
//! let store = AnyStore::connect(&url).await?;
//! store.migrate().await?;
//! let outbox = Outbox::builder(store.clone(), StdoutPublisher::default()).build()?;
//!
//! let mut tx = store.begin().await?;
//! // `?` placeholders on every database (numbered for PostgreSQL by `execute`).
//! tx.execute("INSERT INTO orders (id, total) VALUES (?, ?)", &[42.into(), 9.5.into()])
//!     .await?;
//! let after = outbox
//!     .enqueue(&mut tx, [Message::new("orders.placed", br#"{"id":42}"#.to_vec())])
//!     .await?;
//! tx.commit(after).await?; // then publish-on-commit messages go out
//! # Ok(()) }
//! ```
//!
//! The relay, the cleaner and the console take an `AnyStore` as they take any store
//! (`outbox.relay()`, `Relay::builder(store, publisher)`). For SQL that `execute` does not
//! cover (reads, savepoints, database-specific types), match on the transaction and use the
//! database's own handle: `AnyTransaction::Postgres(tx)` is a `sqlx::Transaction`.

use std::time::{Duration, SystemTime};

use crate::mysql::{self, MySqlOptions, MySqlStore};
use crate::postgres::{self, PgOptions, PgStore};
use async_trait::async_trait;
use outbox_core::{
    AfterCommit, Claim, Claimed, Enqueue, Error, Failure, MessageFilter, NewMessage, ParkedUnit,
    Result, SchemaReport, Selector, Stats, Store, StoreAdmin, StoredMessage,
};
use outbox_sqlite::rusqlite;
use outbox_sqlite::{SqliteOptions, SqliteStore};

/// One of the SQL stores, chosen by URL (see [`AnyStore::connect`]).
#[derive(Clone)]
pub enum AnyStore {
    /// `sqlite://PATH` or `sqlite:PATH`.
    Sqlite(SqliteStore),
    /// `postgres://…` or `postgresql://…`.
    Postgres(PgStore),
    /// `mysql://…` or `mariadb://…`.
    MySql(MySqlStore),
}

/// Settings of [`AnyStore::connect_with`] that every store has.
#[derive(Debug, Clone)]
pub struct AnyOptions {
    /// The outbox table (default `outbox`).
    pub table: String,
    /// SQLite only: create the database file when it does not exist (default true).
    pub create: bool,
    /// PostgreSQL and MySQL: the most connections the store's pool opens (default 5; a
    /// relay needs 1 per batch in flight, plus 1 for background work). PostgreSQL's `LISTEN`
    /// connection is apart.
    pub max_connections: u32,
    /// PostgreSQL only: hear commits through a `LISTEN` connection (default true); false
    /// polls instead ([`PgOptions::listen`]).
    pub listen: bool,
}

impl Default for AnyOptions {
    fn default() -> Self {
        Self {
            table: "outbox".into(),
            create: true,
            max_connections: 5,
            listen: true,
        }
    }
}

/// `f(store)` on whichever store `self` holds.
macro_rules! each {
    ($self:expr, $s:ident => $e:expr) => {
        match $self {
            AnyStore::Sqlite($s) => $e,
            AnyStore::Postgres($s) => $e,
            AnyStore::MySql($s) => $e,
        }
    };
}

impl AnyStore {
    /// The store a URL names, with the default table: `sqlite://PATH` (or `sqlite:PATH`),
    /// `postgres://…` / `postgresql://…`, `mysql://…` / `mariadb://…` (TLS parameters as
    /// for each store).
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, AnyOptions::default()).await
    }

    /// As [`connect`](Self::connect), with options. An unknown scheme is a configuration
    /// error that names the URL without its password.
    pub async fn connect_with(url: &str, options: AnyOptions) -> Result<Self> {
        if options.max_connections == 0 {
            return Err(Error::config("max_connections must be at least 1"));
        }
        match url.split(':').next().unwrap_or("") {
            "sqlite" => Ok(Self::Sqlite(SqliteStore::open_with(
                url,
                SqliteOptions {
                    table: options.table,
                    create: options.create,
                    ..Default::default()
                },
            )?)),
            "postgres" | "postgresql" => Ok(Self::Postgres(
                PgStore::connect_with(
                    url,
                    PgOptions {
                        table: options.table,
                        max_connections: options.max_connections,
                        listen: options.listen,
                        ..Default::default()
                    },
                )
                .await?,
            )),
            "mysql" | "mariadb" => Ok(Self::MySql(
                MySqlStore::connect_with(
                    &url.replacen("mariadb://", "mysql://", 1),
                    MySqlOptions {
                        table: options.table,
                        max_connections: options.max_connections,
                        ..Default::default()
                    },
                )
                .await?,
            )),
            _ if !url.contains("://") => Err(Error::config(format!(
                "unsupported store URL {}: a SQLite file is sqlite://{}; other stores: postgres://, mysql://",
                outbox_core::redact_url(url),
                outbox_core::redact_url(url)
            ))),
            _ => Err(Error::config(format!(
                "unsupported store URL {}: use sqlite://, postgres:// or mysql://",
                outbox_core::redact_url(url)
            ))),
        }
    }

    /// `"sqlite"`, `"postgres"` or `"mysql"`.
    pub fn backend(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::Postgres(_) => "postgres",
            Self::MySql(_) => "mysql",
        }
    }

    /// The outbox table.
    pub fn table(&self) -> &str {
        each!(self, s => s.table())
    }

    /// Whether the outbox table exists (`migrate` has run).
    pub async fn table_exists(&self) -> Result<bool> {
        match self {
            Self::Sqlite(s) => s.table_exists(),
            Self::Postgres(s) => s.table_exists().await,
            Self::MySql(s) => s.table_exists().await,
        }
    }

    /// Begin a transaction on the store's database: enqueue in it with
    /// [`Outbox::enqueue`](outbox_core::Outbox::enqueue), write business data with
    /// [`AnyTransaction::execute`] (or the database's own handle), then
    /// [`commit`](AnyTransaction::commit). A SQLite transaction is `BEGIN IMMEDIATE` on a
    /// connection of its own: it takes the write lock at once (waiting up to the busy
    /// timeout on a blocking thread), so it never fails later for want of it.
    pub async fn begin(&self) -> Result<AnyTransaction> {
        match self {
            Self::Sqlite(s) => {
                let conn = s.connect()?;
                let conn = tokio::task::spawn_blocking(move || {
                    conn.execute_batch("BEGIN IMMEDIATE")
                        .map(|()| conn)
                        .map_err(outbox_sqlite::map_err)
                })
                .await
                .map_err(|e| Error::store("SQLite BEGIN task failed").with_source(e))??;
                Ok(AnyTransaction::Sqlite(SqliteTx { conn: Some(conn) }))
            }
            Self::Postgres(s) => Ok(AnyTransaction::Postgres(
                s.pool().begin().await.map_err(postgres::map_err)?,
            )),
            Self::MySql(s) => Ok(AnyTransaction::MySql(
                s.pool().begin().await.map_err(mysql::map_err)?,
            )),
        }
    }
}

impl std::fmt::Debug for AnyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnyStore")
            .field("backend", &self.backend())
            .field("table", &self.table())
            .finish()
    }
}

/// A transaction of an [`AnyStore`]: the database's own, one variant per database. Dropped
/// without [`commit`](Self::commit), it rolls back.
pub enum AnyTransaction {
    /// A SQLite connection inside `BEGIN IMMEDIATE`.
    Sqlite(SqliteTx),
    /// A PostgreSQL transaction (sqlx).
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
    /// A MySQL or MariaDB transaction (sqlx).
    MySql(sqlx::Transaction<'static, sqlx::MySql>),
}

/// A SQLite connection inside a transaction; rolled back when dropped uncommitted.
pub struct SqliteTx {
    conn: Option<rusqlite::Connection>,
}

impl SqliteTx {
    /// The connection, for SQL of your own inside the transaction (rusqlite's API).
    pub fn connection(&self) -> &rusqlite::Connection {
        self.conn
            .as_ref()
            .expect("a SqliteTx holds its connection until it ends")
    }

    /// The connection, to end the transaction on (then dropping `self` does nothing).
    fn end(mut self) -> rusqlite::Connection {
        self.conn
            .take()
            .expect("a SqliteTx holds its connection until it ends")
    }
}

impl Drop for SqliteTx {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            let _ = conn.execute_batch("ROLLBACK");
        }
    }
}

/// A value for [`AnyTransaction::execute`].
#[derive(Debug, Clone, PartialEq)]
pub enum AnyValue {
    /// SQL `NULL` (written into the statement as `NULL` on PostgreSQL, whose parameters are
    /// typed).
    Null,
    /// A boolean (0 or 1 on SQLite and MySQL).
    Bool(bool),
    /// An integer.
    I64(i64),
    /// A floating-point number.
    F64(f64),
    /// Text.
    Text(String),
    /// Bytes.
    Bytes(Vec<u8>),
}

macro_rules! any_value_from {
    ($($t:ty => $v:ident($conv:expr)),* $(,)?) => {$(
        impl From<$t> for AnyValue {
            fn from(x: $t) -> Self {
                AnyValue::$v($conv(x))
            }
        }
    )*};
}

any_value_from!(
    bool => Bool(|x| x),
    i32 => I64(i64::from),
    i64 => I64(|x| x),
    u32 => I64(i64::from),
    f64 => F64(|x| x),
    String => Text(|x| x),
    &str => Text(str::to_owned),
    Vec<u8> => Bytes(|x| x),
    &[u8] => Bytes(<[u8]>::to_vec),
);

impl<T: Into<AnyValue>> From<Option<T>> for AnyValue {
    fn from(x: Option<T>) -> Self {
        x.map_or(AnyValue::Null, Into::into)
    }
}

impl rusqlite::ToSql for AnyValue {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, Value, ValueRef};
        Ok(match self {
            AnyValue::Null => ToSqlOutput::Owned(Value::Null),
            AnyValue::Bool(b) => ToSqlOutput::Owned(Value::Integer(i64::from(*b))),
            AnyValue::I64(i) => ToSqlOutput::Owned(Value::Integer(*i)),
            AnyValue::F64(f) => ToSqlOutput::Owned(Value::Real(*f)),
            AnyValue::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            AnyValue::Bytes(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
        })
    }
}

/// Bind `args` in order to a sqlx query (`None` values are written into the SQL instead).
macro_rules! bind_all {
    ($q:expr, $args:expr) => {{
        let mut q = $q;
        for a in $args {
            q = match a {
                AnyValue::Null => q.bind(None::<String>),
                AnyValue::Bool(b) => q.bind(*b),
                AnyValue::I64(i) => q.bind(*i),
                AnyValue::F64(f) => q.bind(*f),
                AnyValue::Text(s) => q.bind(s.as_str()),
                AnyValue::Bytes(b) => q.bind(b.as_slice()),
            };
        }
        q
    }};
}

impl AnyTransaction {
    /// `"sqlite"`, `"postgres"` or `"mysql"`.
    pub fn backend(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::Postgres(_) => "postgres",
            Self::MySql(_) => "mysql",
        }
    }

    /// Run one statement with `?` placeholders on whichever database this is; returns the
    /// rows it changed. On PostgreSQL the placeholders are numbered (`$1`, …; a `NULL` is
    /// written in place) outside quotes and comments, so the statement cannot use
    /// PostgreSQL's `?` operators: use the `Postgres` variant's own transaction for those.
    /// A placeholder count that differs from `args` is an error before anything runs.
    pub async fn execute(&mut self, sql: &str, args: &[AnyValue]) -> Result<u64> {
        let marks = placeholders(sql);
        if marks.len() != args.len() {
            return Err(Error::config(format!(
                "AnyTransaction::execute: the statement has {} `?` placeholder(s) and {} value(s)",
                marks.len(),
                args.len()
            )));
        }
        match self {
            Self::Sqlite(tx) => tx
                .connection()
                .execute(sql, rusqlite::params_from_iter(args))
                .map(|n| n as u64)
                .map_err(outbox_sqlite::map_err),
            Self::Postgres(tx) => {
                let (numbered, bound) = number_placeholders(sql, &marks, args);
                let q = bind_all!(sqlx::query(&numbered), bound);
                q.execute(&mut **tx)
                    .await
                    .map(|r| r.rows_affected())
                    .map_err(postgres::map_err)
            }
            Self::MySql(tx) => {
                let q = bind_all!(sqlx::query(sql), args);
                q.execute(&mut **tx)
                    .await
                    .map(|r| r.rows_affected())
                    .map_err(mysql::map_err)
            }
        }
    }

    /// Commit, then publish `after`'s publish-on-commit messages in the background and wake
    /// local relays (as each store's `commit` does). Nothing is published if the commit fails.
    pub async fn commit(self, after: AfterCommit) -> Result<()> {
        match self {
            Self::Sqlite(tx) => {
                let conn = tx.end();
                if let Err(e) = conn.execute_batch("COMMIT") {
                    let _ = conn.execute_batch("ROLLBACK");
                    return Err(outbox_sqlite::map_err(e));
                }
                after.dispatch();
                Ok(())
            }
            Self::Postgres(tx) => postgres::commit(tx, after).await,
            Self::MySql(tx) => mysql::commit(tx, after).await,
        }
    }

    /// Roll back (as dropping the transaction does, but waiting for it and reporting errors).
    pub async fn rollback(self) -> Result<()> {
        match self {
            Self::Sqlite(tx) => tx
                .end()
                .execute_batch("ROLLBACK")
                .map_err(outbox_sqlite::map_err),
            Self::Postgres(tx) => tx.rollback().await.map_err(postgres::map_err),
            Self::MySql(tx) => tx.rollback().await.map_err(mysql::map_err),
        }
    }
}

/// Byte offsets of the `?` placeholders of `sql`: outside '…' and "…" (doubled quotes and
/// backslash escapes inside), `…` identifiers, `$tag$…$tag$` bodies and `--` / `/* */`
/// comments.
fn placeholders(sql: &str) -> Vec<usize> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            q @ (b'\'' | b'"' | b'`') => {
                i += 1;
                while i < b.len() {
                    if b[i] == b'\\' && q != b'`' {
                        i += 2;
                        continue;
                    }
                    if b[i] == q {
                        if b.get(i + 1) == Some(&q) {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                i += 1;
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i < b.len() && !(b[i] == b'*' && b.get(i + 1) == Some(&b'/')) {
                    i += 1;
                }
                i += 2;
            }
            b'$' => {
                // A dollar-quoted body: $$…$$ or $tag$…$tag$ (a tag is a name).
                let tag_end = b[i + 1..]
                    .iter()
                    .position(|c| !(c.is_ascii_alphanumeric() || *c == b'_'))
                    .map(|n| i + 1 + n);
                match tag_end {
                    Some(e)
                        if b[e] == b'$' && !b[i + 1..e].first().is_some_and(u8::is_ascii_digit) =>
                    {
                        let tag = &sql[i..=e];
                        match sql[e + 1..].find(tag) {
                            Some(end) => i = e + 1 + end + tag.len(),
                            None => i = b.len(),
                        }
                    }
                    _ => i += 1,
                }
            }
            b'?' => {
                out.push(i);
                i += 1;
            }
            _ => i += 1,
        }
    }
    out
}

/// `sql` with its placeholders (at `marks`) numbered for PostgreSQL, `NULL` written in place
/// of null values, and the values left to bind.
fn number_placeholders<'a>(
    sql: &str,
    marks: &[usize],
    args: &'a [AnyValue],
) -> (String, Vec<&'a AnyValue>) {
    let mut out = String::with_capacity(sql.len() + marks.len() * 2);
    let mut bound = Vec::with_capacity(args.len());
    let mut last = 0;
    for (&at, arg) in marks.iter().zip(args) {
        out.push_str(&sql[last..at]);
        if *arg == AnyValue::Null {
            out.push_str("NULL");
        } else {
            bound.push(arg);
            out.push_str(&format!("${}", bound.len()));
        }
        last = at + 1;
    }
    out.push_str(&sql[last..]);
    (out, bound)
}

#[async_trait]
impl Enqueue<AnyTransaction> for AnyStore {
    async fn write_rows(
        &self,
        tx: &mut AnyTransaction,
        rows: &[NewMessage],
        need_seqs: bool,
    ) -> Result<Vec<i64>> {
        match (self, tx) {
            (Self::Sqlite(s), AnyTransaction::Sqlite(t)) => s.write_rows_in(t.connection(), rows),
            (Self::Postgres(s), AnyTransaction::Postgres(t)) => {
                s.write_rows(t, rows, need_seqs).await
            }
            (Self::MySql(s), AnyTransaction::MySql(t)) => s.write_rows(t, rows, need_seqs).await,
            (s, t) => Err(Error::config(format!(
                "a {} transaction cannot enqueue into a {} store: begin it with that store's begin()",
                t.backend(),
                s.backend()
            ))),
        }
    }
}

#[async_trait]
impl Store for AnyStore {
    async fn migrate(&self) -> Result<()> {
        each!(self, s => s.migrate().await)
    }
    async fn insert(&self, rows: &[NewMessage]) -> Result<Vec<i64>> {
        each!(self, s => s.insert(rows).await)
    }
    async fn claim(&self, claim: &Claim) -> Result<Vec<Claimed>> {
        each!(self, s => s.claim(claim).await)
    }
    async fn complete(&self, seqs: &[i64], delete: bool) -> Result<()> {
        each!(self, s => s.complete(seqs, delete).await)
    }
    async fn fail(&self, owner: &str, failures: &[Failure]) -> Result<()> {
        each!(self, s => s.fail(owner, failures).await)
    }
    async fn settle(
        &self,
        owner: &str,
        done: &[i64],
        delete: bool,
        failures: &[Failure],
    ) -> Result<()> {
        each!(self, s => s.settle(owner, done, delete, failures).await)
    }
    async fn park_unit(&self, stream: &str, unit: &str, reason: &str) -> Result<()> {
        each!(self, s => s.park_unit(stream, unit, reason).await)
    }
    async fn wait_for_work(&self, timeout: Duration) {
        each!(self, s => s.wait_for_work(timeout).await)
    }
    async fn start_listening(&self) -> Result<()> {
        each!(self, s => s.start_listening().await)
    }
    fn notify_committed(&self) {
        each!(self, s => s.notify_committed())
    }
    fn signing_scope(&self) -> String {
        each!(self, s => s.signing_scope())
    }
}

#[async_trait]
impl StoreAdmin for AnyStore {
    async fn schema(&self) -> Result<SchemaReport> {
        each!(self, s => s.schema().await)
    }
    async fn stats(&self) -> Result<Stats> {
        each!(self, s => s.stats().await)
    }
    async fn get(&self, seq: i64) -> Result<Option<StoredMessage>> {
        each!(self, s => s.get(seq).await)
    }
    async fn messages(&self, filter: &MessageFilter) -> Result<Vec<StoredMessage>> {
        each!(self, s => s.messages(filter).await)
    }
    async fn dead_letters(&self, stream: Option<&str>, limit: usize) -> Result<Vec<StoredMessage>> {
        each!(self, s => s.dead_letters(stream, limit).await)
    }
    async fn requeue(&self, selector: &Selector) -> Result<u64> {
        each!(self, s => s.requeue(selector).await)
    }
    async fn purge_dead(&self, selector: &Selector) -> Result<u64> {
        each!(self, s => s.purge_dead(selector).await)
    }
    async fn parked_units(&self, stream: Option<&str>, limit: usize) -> Result<Vec<ParkedUnit>> {
        each!(self, s => s.parked_units(stream, limit).await)
    }
    async fn resume_unit(&self, stream: &str, unit: &str) -> Result<()> {
        each!(self, s => s.resume_unit(stream, unit).await)
    }
    async fn skip_head(&self, stream: &str, unit: &str) -> Result<Option<i64>> {
        each!(self, s => s.skip_head(stream, unit).await)
    }
    async fn clean(
        &self,
        sent_before: SystemTime,
        limit: usize,
        include_dead: bool,
    ) -> Result<u64> {
        each!(self, s => s.clean(sent_before, limit, include_dead).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_outside_quotes_and_comments() {
        let sql = "INSERT INTO t (a, \"b?\", `c?`) VALUES (?, '?''?', ?) -- ?\n/* ? */ RETURNING $$?$$, $x$ ? $x$, ?";
        let marks = placeholders(sql);
        assert_eq!(marks.len(), 3, "{marks:?}");
        let args = [AnyValue::I64(1), AnyValue::Null, AnyValue::Text("x".into())];
        let (numbered, bound) = number_placeholders(sql, &marks, &args);
        assert_eq!(
            numbered,
            "INSERT INTO t (a, \"b?\", `c?`) VALUES ($1, '?''?', NULL) -- ?\n/* ? */ RETURNING $$?$$, $x$ ? $x$, $2"
        );
        assert_eq!(bound, vec![&args[0], &args[2]]);
        // Backslash escapes (MySQL) and an unterminated quote.
        assert_eq!(placeholders(r"SELECT 'a\'?', ?").len(), 1);
        assert_eq!(placeholders("SELECT '?").len(), 0);
        // A positional parameter is not a dollar quote.
        assert_eq!(placeholders("SELECT $1, ?").len(), 1);
    }
}
