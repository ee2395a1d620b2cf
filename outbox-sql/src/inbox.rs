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

// ------------------------------------------------------------------------------ PostgreSQL

#[cfg(feature = "postgres")]
mod pg {
    use super::*;
    use sqlx::Postgres;

    impl SqlInboxTable<Postgres> {
        /// Create the table and its indexes (idempotent).
        pub async fn migrate(&self) -> outbox_core::Result<()> {
            let t = &self.table;
            // The hot table has no index on `state`, so marking a message done can be a
            // HOT update (no index writes); dead letters live in `<table>_dead`.
            let ddl = [
                format!(
                    "CREATE TABLE IF NOT EXISTS {t} (
                        consumer TEXT NOT NULL,
                        id UUID NOT NULL,
                        state TEXT NOT NULL CHECK (state IN ('started', 'done', 'dead')),
                        attempts INTEGER NOT NULL DEFAULT 0,
                        first_seen_at BIGINT NOT NULL,
                        done_at BIGINT,
                        last_error TEXT,
                        PRIMARY KEY (consumer, id)
                    ) WITH (fillfactor = 80)"
                ),
                format!("CREATE INDEX IF NOT EXISTS {t}_seen ON {t} USING brin (first_seen_at)"),
                format!(
                    "CREATE TABLE IF NOT EXISTS {t}_dead (
                        consumer TEXT NOT NULL,
                        id UUID NOT NULL,
                        state TEXT NOT NULL CHECK (state IN ('dead', 'requeued')),
                        attempts INTEGER NOT NULL,
                        first_seen_at BIGINT NOT NULL,
                        dead_at BIGINT NOT NULL,
                        error TEXT,
                        source TEXT,
                        stream TEXT,
                        msg_key TEXT,
                        content_type TEXT,
                        headers TEXT,
                        payload BYTEA,
                        PRIMARY KEY (consumer, id)
                    )"
                ),
                format!(
                    "CREATE INDEX IF NOT EXISTS {t}_dead_state ON {t}_dead (consumer, state, dead_at)"
                ),
            ];
            // Two processes migrating at once: the advisory lock makes the second wait.
            let mut tx = self.pool.begin().await.map_err(map_err)?;
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
                .bind(format!("outbox inbox {t}"))
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
            for statement in &ddl {
                sqlx::query(statement)
                    .execute(&mut *tx)
                    .await
                    .map_err(map_err)?;
            }
            tx.commit().await.map_err(map_err)
        }

        /// Dead letters, oldest first (of one consumer, or all), at most `limit`.
        pub async fn dead_letters(
            &self,
            consumer: Option<&str>,
            limit: usize,
        ) -> outbox_core::Result<Vec<InboxDeadLetter>> {
            let t = &self.table;
            let rows = sqlx::query(&format!(
                "SELECT consumer, id::text, source, stream, msg_key, content_type, headers, payload,
                        attempts::int8, error, first_seen_at
                 FROM {t}_dead WHERE state = 'dead' AND ($1::text IS NULL OR consumer = $1)
                 ORDER BY dead_at, id LIMIT $2"
            ))
            .bind(consumer)
            .bind(limit.clamp(1, outbox_core::MAX_PAGE) as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.explain(e))?;
            rows.iter().map(dead_letter_row).collect()
        }

        /// Put a dead letter back for its consumer, which processes it again (attempts from
        /// zero) on its next round. `NotFound` when it is not a dead letter.
        pub async fn requeue(&self, consumer: &str, id: MessageId) -> outbox_core::Result<()> {
            let t = &self.table;
            let n = sqlx::query(&format!(
                "UPDATE {t}_dead SET state = 'requeued' WHERE consumer = $1 AND id = $2::uuid AND state = 'dead'"
            ))
            .bind(consumer)
            .bind(id.to_string())
            .execute(&self.pool)
            .await
            .map_err(|e| self.explain(e))?
            .rows_affected();
            if n == 0 {
                return Err(Error::not_found(format!(
                    "message {id} is not a dead letter of consumer {consumer:?}"
                )));
            }
            Ok(())
        }

        /// Delete the marks of messages processed more than `older_than` ago, at most
        /// `limit`; returns how many.
        pub async fn clean(&self, older_than: Duration, limit: usize) -> outbox_core::Result<u64> {
            let t = &self.table;
            let horizon = to_millis(outbox_core::cutoff("inbox retention", older_than)?);
            sqlx::query(&format!(
                "DELETE FROM {t} WHERE (consumer, id) IN
                   (SELECT consumer, id FROM {t} WHERE first_seen_at < $1 AND state = 'done' LIMIT $2)"
            ))
            .bind(horizon)
            .bind(limit.max(1) as i64)
            .execute(&self.pool)
            .await
            .map(|r| r.rows_affected())
            .map_err(|e| self.explain(e))
        }
    }

    #[async_trait]
    impl<H: SqlHandler<Postgres>> Inbox for SqlInbox<Postgres, H> {
        fn consumer(&self) -> &str {
            &self.consumer
        }

        async fn start(&self, ids: &[MessageId]) -> outbox_core::Result<Vec<Seen>> {
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            let t = &self.table.table;
            let rows = sqlx::query(&format!(
                "INSERT INTO {t} AS i (consumer, id, state, attempts, first_seen_at)
                 SELECT $1, u::uuid, 'started', 1, $3 FROM unnest($2::text[]) AS u
                 ON CONFLICT (consumer, id) DO UPDATE SET attempts =
                   CASE WHEN i.state = 'started' THEN i.attempts + 1 ELSE i.attempts END
                 RETURNING id::text, state, attempts::int8"
            ))
            .bind(&*self.consumer)
            .bind(distinct_sorted(ids))
            .bind(now_ms())
            .fetch_all(&self.table.pool)
            .await
            .map_err(|e| self.table.explain(e))?;
            let mut answers = HashMap::with_capacity(rows.len());
            for r in &rows {
                let id: String = r.try_get(0).map_err(map_err)?;
                let state: String = r.try_get(1).map_err(map_err)?;
                answers.insert(id, seen(&state, r.try_get(2).map_err(map_err)?));
            }
            in_order(ids, answers)
        }

        async fn process(&self, message: &Received) -> outbox_core::Result<Processed> {
            let t = &self.table.table;
            let mut tx = self.table.pool.begin().await.map_err(map_err)?;
            let now = now_ms();
            let marked = sqlx::query(&format!(
                "INSERT INTO {t} AS i (consumer, id, state, attempts, first_seen_at, done_at)
                 VALUES ($1, $2::uuid, 'done', 1, $3, $3)
                 ON CONFLICT (consumer, id) DO UPDATE SET state = 'done',
                   done_at = EXCLUDED.done_at, last_error = NULL
                 WHERE i.state = 'started'"
            ))
            .bind(&*self.consumer)
            .bind(message.id.to_string())
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.table.explain(e))?
            .rows_affected();
            if marked == 0 {
                return Ok(Processed::Duplicate); // rolled back on drop
            }
            self.handler.handle(&mut tx, message).await?;
            tx.commit().await.map_err(map_err)?;
            Ok(Processed::Done)
        }

        async fn failed(&self, id: MessageId, error: &str) -> outbox_core::Result<u32> {
            let t = &self.table.table;
            let attempts: Option<i64> = sqlx::query_scalar(&format!(
                "UPDATE {t} SET last_error = $3 WHERE consumer = $1 AND id = $2::uuid
                 RETURNING attempts::int8"
            ))
            .bind(&*self.consumer)
            .bind(id.to_string())
            .bind(error)
            .fetch_optional(&self.table.pool)
            .await
            .map_err(|e| self.table.explain(e))?;
            Ok(attempts.unwrap_or(1).clamp(0, u32::MAX as i64) as u32)
        }

        async fn dead_letter(&self, message: &Received, error: &str) -> outbox_core::Result<()> {
            let t = &self.table.table;
            let mut tx = self.table.pool.begin().await.map_err(map_err)?;
            let now = now_ms();
            // Never over a done mark: a message processed meanwhile stays processed.
            let row: Option<(i64, i64)> = sqlx::query_as(&format!(
                "INSERT INTO {t} AS i (consumer, id, state, attempts, first_seen_at, last_error)
                 VALUES ($1, $2::uuid, 'dead', 1, $3, $4)
                 ON CONFLICT (consumer, id) DO UPDATE SET state = 'dead',
                   last_error = EXCLUDED.last_error
                 WHERE i.state <> 'done'
                 RETURNING attempts::int8, first_seen_at"
            ))
            .bind(&*self.consumer)
            .bind(message.id.to_string())
            .bind(now)
            .bind(error)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| self.table.explain(e))?;
            if let Some((attempts, first_seen)) = row {
                sqlx::query(&format!(
                    "INSERT INTO {t}_dead AS d (consumer, id, state, attempts, first_seen_at, dead_at,
                       error, source, stream, msg_key, content_type, headers, payload)
                     VALUES ($1, $2::uuid, 'dead', $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
                     ON CONFLICT (consumer, id) DO UPDATE SET state = 'dead',
                       attempts = EXCLUDED.attempts, dead_at = EXCLUDED.dead_at,
                       error = EXCLUDED.error, source = EXCLUDED.source,
                       stream = EXCLUDED.stream, msg_key = EXCLUDED.msg_key,
                       content_type = EXCLUDED.content_type, headers = EXCLUDED.headers,
                       payload = EXCLUDED.payload"
                ))
                .bind(&*self.consumer)
                .bind(message.id.to_string())
                .bind(attempts.clamp(0, i32::MAX as i64) as i32)
                .bind(first_seen)
                .bind(now)
                .bind(error)
                .bind(&message.source)
                .bind(&message.stream)
                .bind(&message.key)
                .bind(&message.content_type)
                .bind(headers_json(message)?)
                .bind(&message.payload)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.table.explain(e))?;
            }
            tx.commit().await.map_err(map_err)?;
            Ok(())
        }

        async fn requeued(&self, limit: usize) -> outbox_core::Result<Vec<Received>> {
            let t = &self.table.table;
            let mut tx = self.table.pool.begin().await.map_err(map_err)?;
            let rows = sqlx::query(&format!(
                "DELETE FROM {t}_dead WHERE consumer = $1 AND id IN (SELECT id FROM {t}_dead
                   WHERE consumer = $1 AND state = 'requeued' LIMIT $2 FOR UPDATE SKIP LOCKED)
                 RETURNING id::text, source, stream, msg_key, content_type, headers, payload"
            ))
            .bind(&*self.consumer)
            .bind(limit.max(1) as i64)
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| self.table.explain(e))?;
            let mut out = Vec::with_capacity(rows.len());
            for r in &rows {
                let id: String = r.try_get(0).map_err(map_err)?;
                out.push(Received::from_stored(
                    &id,
                    r.try_get(1).map_err(map_err)?,
                    r.try_get(2).map_err(map_err)?,
                    r.try_get(3).map_err(map_err)?,
                    r.try_get(4).map_err(map_err)?,
                    r.try_get(5).map_err(map_err)?,
                    r.try_get(6).map_err(map_err)?,
                )?);
            }
            if !out.is_empty() {
                let ids: Vec<String> = out.iter().map(|m| m.id.to_string()).collect();
                sqlx::query(&format!(
                    "UPDATE {t} SET state = 'started', attempts = 0
                     WHERE consumer = $1 AND id = ANY($2::text[]::uuid[])"
                ))
                .bind(&*self.consumer)
                .bind(ids)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
            }
            tx.commit().await.map_err(map_err)?;
            Ok(out)
        }
    }

    #[async_trait]
    impl outbox_core::InboxAdmin for SqlInboxTable<Postgres> {
        fn table(&self) -> &str {
            &self.table
        }
        async fn migrate(&self) -> outbox_core::Result<()> {
            SqlInboxTable::<Postgres>::migrate(self).await
        }
        async fn dead_letters(
            &self,
            consumer: Option<&str>,
            limit: usize,
        ) -> outbox_core::Result<Vec<InboxDeadLetter>> {
            SqlInboxTable::<Postgres>::dead_letters(self, consumer, limit).await
        }
        async fn requeue(&self, consumer: &str, id: MessageId) -> outbox_core::Result<()> {
            SqlInboxTable::<Postgres>::requeue(self, consumer, id).await
        }
        async fn clean(&self, older_than: Duration, limit: usize) -> outbox_core::Result<u64> {
            SqlInboxTable::<Postgres>::clean(self, older_than, limit).await
        }
    }

    impl crate::postgres::PgStore {
        /// The inbox table `table` in this store's database, on its pool.
        pub fn inbox_table(&self, table: &str) -> outbox_core::Result<SqlInboxTable<Postgres>> {
            SqlInboxTable::new(self.pool().clone(), table)
        }
    }
}

// --------------------------------------------------------------------------- MySQL/MariaDB

#[cfg(feature = "mysql")]
mod my {
    use super::*;
    use sqlx::Connection;
    use sqlx::MySql;

    impl SqlInboxTable<MySql> {
        /// Create the table and its indexes (idempotent).
        pub async fn migrate(&self) -> outbox_core::Result<()> {
            let t = &self.table;
            // Dead letters live in `<table>_dead`: the hot table has no index on `state`.
            sqlx::raw_sql(&format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                    consumer VARBINARY(800) NOT NULL,
                    id CHAR(36) CHARACTER SET ascii NOT NULL,
                    state VARCHAR(8) CHARACTER SET ascii NOT NULL,
                    attempts INT NOT NULL DEFAULT 0,
                    first_seen_at BIGINT NOT NULL,
                    done_at BIGINT NULL,
                    last_error TEXT NULL,
                    PRIMARY KEY (consumer, id),
                    KEY {t}_seen (first_seen_at)
                ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
                CREATE TABLE IF NOT EXISTS {t}_dead (
                    consumer VARBINARY(800) NOT NULL,
                    id CHAR(36) CHARACTER SET ascii NOT NULL,
                    state VARCHAR(8) CHARACTER SET ascii NOT NULL,
                    attempts INT NOT NULL,
                    first_seen_at BIGINT NOT NULL,
                    dead_at BIGINT NOT NULL,
                    error TEXT NULL,
                    source TEXT NULL,
                    stream TEXT NULL,
                    msg_key TEXT NULL,
                    content_type TEXT NULL,
                    headers LONGTEXT NULL,
                    payload LONGBLOB NULL,
                    PRIMARY KEY (consumer, id),
                    KEY {t}_dead_state (consumer, state, dead_at)
                ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4"
            ))
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
            Ok(())
        }

        /// Dead letters, oldest first (of one consumer, or all), at most `limit`.
        pub async fn dead_letters(
            &self,
            consumer: Option<&str>,
            limit: usize,
        ) -> outbox_core::Result<Vec<InboxDeadLetter>> {
            let t = &self.table;
            let rows = sqlx::query(&format!(
                "SELECT CONVERT(consumer USING utf8mb4), id, source, stream, msg_key, content_type,
                        headers, payload, CAST(attempts AS SIGNED), error, first_seen_at
                 FROM {t}_dead WHERE state = 'dead' AND (? IS NULL OR consumer = ?)
                 ORDER BY dead_at, id LIMIT ?"
            ))
            .bind(consumer)
            .bind(consumer)
            .bind(limit.clamp(1, outbox_core::MAX_PAGE) as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.explain(e))?;
            rows.iter().map(dead_letter_row).collect()
        }

        /// Put a dead letter back for its consumer. `NotFound` when it is not a dead letter.
        pub async fn requeue(&self, consumer: &str, id: MessageId) -> outbox_core::Result<()> {
            let t = &self.table;
            let n = sqlx::query(&format!(
                "UPDATE {t}_dead SET state = 'requeued' WHERE consumer = ? AND id = ? AND state = 'dead'"
            ))
            .bind(consumer)
            .bind(id.to_string())
            .execute(&self.pool)
            .await
            .map_err(|e| self.explain(e))?
            .rows_affected();
            if n == 0 {
                return Err(Error::not_found(format!(
                    "message {id} is not a dead letter of consumer {consumer:?}"
                )));
            }
            Ok(())
        }

        /// Delete the marks of messages processed more than `older_than` ago, at most
        /// `limit`; returns how many.
        pub async fn clean(&self, older_than: Duration, limit: usize) -> outbox_core::Result<u64> {
            let t = &self.table;
            let horizon = to_millis(outbox_core::cutoff("inbox retention", older_than)?);
            sqlx::query(&format!(
                "DELETE FROM {t} WHERE first_seen_at < ? AND state = 'done' ORDER BY first_seen_at LIMIT ?"
            ))
            .bind(horizon)
            .bind(limit.max(1) as i64)
            .execute(&self.pool)
            .await
            .map(|r| r.rows_affected())
            .map_err(|e| self.explain(e))
        }
    }

    #[async_trait]
    impl<H: SqlHandler<MySql>> Inbox for SqlInbox<MySql, H> {
        fn consumer(&self) -> &str {
            &self.consumer
        }

        async fn start(&self, ids: &[MessageId]) -> outbox_core::Result<Vec<Seen>> {
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            let t = &self.table.table;
            let distinct = distinct_sorted(ids);
            let now = now_ms();
            let mut conn = self.table.pool.acquire().await.map_err(map_err)?;
            let mut tx = conn.begin().await.map_err(map_err)?;
            let values = vec!["(?, ?, 'started', 1, ?)"; distinct.len()].join(", ");
            let sql = format!(
                "INSERT INTO {t} (consumer, id, state, attempts, first_seen_at) VALUES {values}
                 ON DUPLICATE KEY UPDATE attempts = IF(state = 'started', attempts + 1, attempts)"
            );
            let mut q = sqlx::query(&sql);
            for id in &distinct {
                q = q.bind(&*self.consumer).bind(id).bind(now);
            }
            q.execute(&mut *tx)
                .await
                .map_err(|e| self.table.explain(e))?;
            let marks = vec!["?"; distinct.len()].join(", ");
            let sql = format!(
                "SELECT id, state, CAST(attempts AS SIGNED) FROM {t} WHERE consumer = ? AND id IN ({marks})"
            );
            let mut q = sqlx::query(&sql).bind(&*self.consumer);
            for id in &distinct {
                q = q.bind(id);
            }
            let rows = q.fetch_all(&mut *tx).await.map_err(map_err)?;
            tx.commit().await.map_err(map_err)?;
            let mut answers = HashMap::with_capacity(rows.len());
            for r in &rows {
                let id: String = r.try_get(0).map_err(map_err)?;
                let state: String = r.try_get(1).map_err(map_err)?;
                answers.insert(id, seen(&state, r.try_get(2).map_err(map_err)?));
            }
            in_order(ids, answers)
        }

        async fn process(&self, message: &Received) -> outbox_core::Result<Processed> {
            let t = &self.table.table;
            let mut conn = self.table.pool.acquire().await.map_err(map_err)?;
            let mut tx = conn.begin().await.map_err(map_err)?;
            let now = now_ms();
            let id = message.id.to_string();
            // A locking read of the latest version: a second delivery under way waits here
            // until the first commits, then finds the row done.
            let mut marked = sqlx::query(&format!(
                "UPDATE {t} SET state = 'done', done_at = ?, last_error = NULL
                 WHERE consumer = ? AND id = ? AND state = 'started'"
            ))
            .bind(now)
            .bind(&*self.consumer)
            .bind(&id)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.table.explain(e))?
            .rows_affected();
            if marked == 0 {
                // Never started (a caller without `start`): take it if nobody has a row.
                marked = sqlx::query(&format!(
                    "INSERT IGNORE INTO {t} (consumer, id, state, attempts, first_seen_at, done_at)
                     VALUES (?, ?, 'done', 1, ?, ?)"
                ))
                .bind(&*self.consumer)
                .bind(&id)
                .bind(now)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?
                .rows_affected();
            }
            if marked == 0 {
                return Ok(Processed::Duplicate);
            }
            self.handler.handle(&mut tx, message).await?;
            tx.commit().await.map_err(map_err)?;
            Ok(Processed::Done)
        }

        async fn failed(&self, id: MessageId, error: &str) -> outbox_core::Result<u32> {
            let t = &self.table.table;
            let id = id.to_string();
            sqlx::query(&format!(
                "UPDATE {t} SET last_error = ? WHERE consumer = ? AND id = ?"
            ))
            .bind(error)
            .bind(&*self.consumer)
            .bind(&id)
            .execute(&self.table.pool)
            .await
            .map_err(|e| self.table.explain(e))?;
            let attempts: Option<i64> = sqlx::query_scalar(&format!(
                "SELECT CAST(attempts AS SIGNED) FROM {t} WHERE consumer = ? AND id = ?"
            ))
            .bind(&*self.consumer)
            .bind(&id)
            .fetch_optional(&self.table.pool)
            .await
            .map_err(map_err)?;
            Ok(attempts.unwrap_or(1).clamp(0, u32::MAX as i64) as u32)
        }

        async fn dead_letter(&self, message: &Received, error: &str) -> outbox_core::Result<()> {
            let t = &self.table.table;
            let id = message.id.to_string();
            let now = now_ms();
            let mut tx = self.table.pool.begin().await.map_err(map_err)?;
            // Never over a done mark: a message processed meanwhile stays processed.
            sqlx::query(&format!(
                "INSERT INTO {t} (consumer, id, state, attempts, first_seen_at, last_error)
                 VALUES (?, ?, 'dead', 1, ?, ?)
                 ON DUPLICATE KEY UPDATE
                   last_error = IF(state = 'done', last_error, VALUES(last_error)),
                   state = IF(state = 'done', 'done', 'dead')"
            ))
            .bind(&*self.consumer)
            .bind(&id)
            .bind(now)
            .bind(error)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.table.explain(e))?;
            let row: Option<(String, i64, i64)> = sqlx::query_as(&format!(
                "SELECT state, CAST(attempts AS SIGNED), first_seen_at FROM {t}
                 WHERE consumer = ? AND id = ?"
            ))
            .bind(&*self.consumer)
            .bind(&id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(map_err)?;
            if let Some((state, attempts, first_seen)) = row {
                if state == "dead" {
                    sqlx::query(&format!(
                        "INSERT INTO {t}_dead (consumer, id, state, attempts, first_seen_at, dead_at,
                           error, source, stream, msg_key, content_type, headers, payload)
                         VALUES (?, ?, 'dead', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                         ON DUPLICATE KEY UPDATE state = 'dead', attempts = VALUES(attempts),
                           dead_at = VALUES(dead_at), error = VALUES(error),
                           source = VALUES(source), stream = VALUES(stream),
                           msg_key = VALUES(msg_key), content_type = VALUES(content_type),
                           headers = VALUES(headers), payload = VALUES(payload)"
                    ))
                    .bind(&*self.consumer)
                    .bind(&id)
                    .bind(attempts)
                    .bind(first_seen)
                    .bind(now)
                    .bind(error)
                    .bind(&message.source)
                    .bind(&message.stream)
                    .bind(&message.key)
                    .bind(&message.content_type)
                    .bind(headers_json(message)?)
                    .bind(&message.payload)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| self.table.explain(e))?;
                }
            }
            tx.commit().await.map_err(map_err)?;
            Ok(())
        }

        async fn requeued(&self, limit: usize) -> outbox_core::Result<Vec<Received>> {
            let t = &self.table.table;
            let mut tx = self.table.pool.begin().await.map_err(map_err)?;
            let rows = sqlx::query(&format!(
                "SELECT id, source, stream, msg_key, content_type, headers, payload FROM {t}_dead
                 WHERE consumer = ? AND state = 'requeued' LIMIT ? FOR UPDATE SKIP LOCKED"
            ))
            .bind(&*self.consumer)
            .bind(limit.max(1) as i64)
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| self.table.explain(e))?;
            let mut out = Vec::with_capacity(rows.len());
            for r in &rows {
                let id: String = r.try_get(0).map_err(map_err)?;
                for sql in [
                    format!("DELETE FROM {t}_dead WHERE consumer = ? AND id = ?"),
                    format!(
                        "UPDATE {t} SET state = 'started', attempts = 0 WHERE consumer = ? AND id = ?"
                    ),
                ] {
                    sqlx::query(&sql)
                        .bind(&*self.consumer)
                        .bind(&id)
                        .execute(&mut *tx)
                        .await
                        .map_err(map_err)?;
                }
                out.push(Received::from_stored(
                    &id,
                    r.try_get(1).map_err(map_err)?,
                    r.try_get(2).map_err(map_err)?,
                    r.try_get(3).map_err(map_err)?,
                    r.try_get(4).map_err(map_err)?,
                    r.try_get(5).map_err(map_err)?,
                    r.try_get(6).map_err(map_err)?,
                )?);
            }
            tx.commit().await.map_err(map_err)?;
            Ok(out)
        }
    }

    #[async_trait]
    impl outbox_core::InboxAdmin for SqlInboxTable<MySql> {
        fn table(&self) -> &str {
            &self.table
        }
        async fn migrate(&self) -> outbox_core::Result<()> {
            SqlInboxTable::<MySql>::migrate(self).await
        }
        async fn dead_letters(
            &self,
            consumer: Option<&str>,
            limit: usize,
        ) -> outbox_core::Result<Vec<InboxDeadLetter>> {
            SqlInboxTable::<MySql>::dead_letters(self, consumer, limit).await
        }
        async fn requeue(&self, consumer: &str, id: MessageId) -> outbox_core::Result<()> {
            SqlInboxTable::<MySql>::requeue(self, consumer, id).await
        }
        async fn clean(&self, older_than: Duration, limit: usize) -> outbox_core::Result<u64> {
            SqlInboxTable::<MySql>::clean(self, older_than, limit).await
        }
    }

    impl crate::mysql::MySqlStore {
        /// The inbox table `table` in this store's database, on its pool.
        pub fn inbox_table(&self, table: &str) -> outbox_core::Result<SqlInboxTable<MySql>> {
            SqlInboxTable::new(self.pool().clone(), table)
        }
    }
}
