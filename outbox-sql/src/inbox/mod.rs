//! The inbox on PostgreSQL and MySQL / MariaDB: exactly-once effects for a consumer whose
//! handler writes to the same database (see [`outbox_core::Consumer`]).
//!
//! The table (default `inbox`) has one row per (consumer, message id) with a state:
//! `started` (attempts counted before each attempt), `done`, `dead` (the message kept for
//! operators) or `requeued`. Processing a message is one transaction: the row goes from
//! `started` to `done` and the handler's writes run on the same connection, so both commit or
//! neither does. A second delivery of the same id under way at the same moment waits on that
//! row's lock and then finds it done: it is a duplicate, its handler never runs, and nobody
//! sees an error.

use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use outbox_core::{
    async_trait, from_millis, to_millis, validate_identifier, Error, ErrorKind, Inbox,
    InboxDeadLetter, MessageId, Processed, Received, Retry, Seen,
};
use sqlx::Row;

use crate::common::map_err;

/// What a closure handler returns.
pub type HandlerFuture<'a> = Pin<Box<dyn Future<Output = outbox_core::Result<()>> + Send + 'a>>;

/// A consumer's handler: its writes go through `tx`, the connection of the transaction that
/// also marks the message processed (do not commit or roll back yourself). Return
/// [`Error::handler`] (transient: retried; permanent: a dead letter at once) or any other
/// error (retried while transient).
///
/// A closure works too, through [`handler_fn`].
#[async_trait]
pub trait SqlHandler<DB: sqlx::Database>: Send + Sync + 'static {
    /// Apply one message's effects.
    async fn handle(&self, tx: &mut DB::Connection, message: &Received) -> outbox_core::Result<()>;
}

#[async_trait]
impl<DB, F> SqlHandler<DB> for F
where
    DB: sqlx::Database,
    F: for<'a> Fn(&'a mut DB::Connection, &'a Received) -> HandlerFuture<'a>
        + Send
        + Sync
        + 'static,
{
    async fn handle(&self, tx: &mut DB::Connection, message: &Received) -> outbox_core::Result<()> {
        self(tx, message).await
    }
}

/// A closure as a handler: `handler_fn::<Postgres, _>(|tx, m| Box::pin(async move { …; Ok(()) }))`
/// (the function only gives the closure the signature the compiler needs to see).
pub fn handler_fn<DB, F>(f: F) -> F
where
    DB: sqlx::Database,
    F: for<'a> Fn(&'a mut DB::Connection, &'a Received) -> HandlerFuture<'a>
        + Send
        + Sync
        + 'static,
{
    f
}

/// An inbox table (default name `inbox`) without a handler: its migration and the operators'
/// view (dead letters, requeue, clean). [`SqlInboxTable::consumer`] adds a handler.
pub struct SqlInboxTable<DB: sqlx::Database> {
    pool: sqlx::Pool<DB>,
    table: Arc<str>,
}

impl<DB: sqlx::Database> Clone for SqlInboxTable<DB> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            table: self.table.clone(),
        }
    }
}

impl<DB: sqlx::Database> std::fmt::Debug for SqlInboxTable<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlInboxTable")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

/// The longest consumer name.
pub const MAX_CONSUMER_NAME: usize = 200;

impl<DB: sqlx::Database> SqlInboxTable<DB> {
    /// The inbox table `table` reached through `pool` (a store's pool, or your own).
    pub fn new(pool: sqlx::Pool<DB>, table: &str) -> outbox_core::Result<Self> {
        validate_identifier(table)?;
        Ok(Self {
            pool,
            table: table.into(),
        })
    }

    /// The table name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The inbox of consumer `name` with its handler.
    pub fn consumer<H: SqlHandler<DB>>(
        &self,
        name: &str,
        handler: H,
    ) -> outbox_core::Result<SqlInbox<DB, H>> {
        if name.is_empty() || name.len() > MAX_CONSUMER_NAME || name.chars().any(char::is_control) {
            return Err(Error::config(format!(
                "consumer name must be 1 to {MAX_CONSUMER_NAME} bytes without control characters"
            )));
        }
        Ok(SqlInbox {
            table: self.clone(),
            consumer: name.into(),
            handler: Arc::new(handler),
            _db: PhantomData,
        })
    }

    /// A missing table becomes one clear line.
    fn explain(&self, e: sqlx::Error) -> Error {
        let missing = match &e {
            sqlx::Error::Database(db) => {
                let code = db.code().unwrap_or_default();
                // PostgreSQL undefined_table; MySQL ER_NO_SUCH_TABLE.
                code == "42P01" || code == "42S02" || db.message().contains("doesn't exist")
            }
            _ => false,
        };
        if missing {
            Error::new(
                ErrorKind::Store,
                Retry::Permanent,
                format!(
                    "the inbox table {} does not exist: run its migration (migrate)",
                    self.table
                ),
            )
        } else {
            map_err(e)
        }
    }
}

/// One consumer's inbox: an [`Inbox`] for [`outbox_core::Consumer`].
pub struct SqlInbox<DB: sqlx::Database, H> {
    table: SqlInboxTable<DB>,
    consumer: Arc<str>,
    handler: Arc<H>,
    _db: PhantomData<fn() -> DB>,
}

impl<DB: sqlx::Database, H> std::fmt::Debug for SqlInbox<DB, H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlInbox")
            .field("table", &self.table.table)
            .field("consumer", &self.consumer)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> i64 {
    to_millis(SystemTime::now())
}

fn seen(state: &str, attempts: i64) -> Seen {
    match state {
        "done" => Seen::Done,
        "dead" => Seen::Dead,
        _ => Seen::New {
            attempts: attempts.clamp(1, u32::MAX as i64) as u32,
        },
    }
}

/// The distinct ids, sorted (rows are locked in one order, so two consumers starting
/// overlapping batches cannot deadlock), and the answers mapped back to `ids`' order.
fn distinct_sorted(ids: &[MessageId]) -> Vec<String> {
    let mut v: Vec<String> = ids.iter().map(MessageId::to_string).collect();
    v.sort();
    v.dedup();
    v
}

fn in_order(ids: &[MessageId], answers: HashMap<String, Seen>) -> outbox_core::Result<Vec<Seen>> {
    ids.iter()
        .map(|id| {
            answers
                .get(&id.to_string())
                .copied()
                .ok_or_else(|| Error::store(format!("the inbox did not answer for message {id}")))
        })
        .collect()
}

/// A dead letter from its row (columns: consumer, id, source, stream, key, content type,
/// headers, payload, attempts, error, first seen).
fn dead_letter_row<R>(r: &R) -> outbox_core::Result<InboxDeadLetter>
where
    R: Row,
    usize: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<Vec<u8>>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let get = |e: sqlx::Error| Error::store("cannot read an inbox row").with_source(e);
    let id: String = r.try_get(1).map_err(get)?;
    Ok(InboxDeadLetter {
        consumer: r.try_get(0).map_err(get)?,
        message: Received::from_stored(
            &id,
            r.try_get(2).map_err(get)?,
            r.try_get(3).map_err(get)?,
            r.try_get(4).map_err(get)?,
            r.try_get(5).map_err(get)?,
            r.try_get(6).map_err(get)?,
            r.try_get(7).map_err(get)?,
        )?,
        attempts: r
            .try_get::<i64, _>(8)
            .map_err(get)?
            .clamp(0, u32::MAX as i64) as u32,
        error: r.try_get(9).map_err(get)?,
        first_seen_at: from_millis(r.try_get(10).map_err(get)?),
    })
}

fn headers_json(m: &Received) -> outbox_core::Result<String> {
    serde_json::to_string(&m.headers)
        .map_err(|e| Error::store("cannot encode headers").with_source(e))
}

#[cfg(feature = "postgres")]
mod postgres;

#[cfg(feature = "mysql")]
mod mysql;
