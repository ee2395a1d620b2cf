//! The inbox on SQLite: exactly-once effects for a consumer whose handler writes to this
//! database (see [`outbox_core::Consumer`]).

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use outbox_core::{
    async_trait, from_millis, to_millis, validate_identifier, Error, Inbox, InboxDeadLetter,
    MessageId, Processed, Received, Seen,
};
use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};

use crate::{map_err, SqliteStore};

/// A consumer's handler: its writes go through `tx`, the transaction that also marks the
/// message processed. Return [`Error::handler`] (transient: retried; permanent: a dead letter
/// at once) or any other error (retried while transient).
pub trait SqliteHandler: Send + Sync + 'static {
    /// Apply one message's effects.
    fn handle(&self, tx: &Transaction<'_>, message: &Received) -> outbox_core::Result<()>;
}

impl<F> SqliteHandler for F
where
    F: Fn(&Transaction<'_>, &Received) -> outbox_core::Result<()> + Send + Sync + 'static,
{
    fn handle(&self, tx: &Transaction<'_>, message: &Received) -> outbox_core::Result<()> {
        self(tx, message)
    }
}

/// An inbox table on SQLite (default name `inbox`), without a handler: migrations and the
/// operators' view (dead letters, requeue, clean). [`InboxTable::consumer`] adds a handler.
#[derive(Clone)]
pub struct InboxTable {
    table: Arc<str>,
    conn: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for InboxTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboxTable")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

/// The longest consumer name.
pub const MAX_CONSUMER_NAME: usize = 200;

fn check_consumer(name: &str) -> outbox_core::Result<()> {
    if name.is_empty() || name.len() > MAX_CONSUMER_NAME || name.chars().any(char::is_control) {
        return Err(Error::config(format!(
            "consumer name must be 1 to {MAX_CONSUMER_NAME} bytes without control characters"
        )));
    }
    Ok(())
}

impl InboxTable {
    /// The inbox table `table` in `store`'s database file (a connection of its own).
    pub fn new(store: &SqliteStore, table: &str) -> outbox_core::Result<Self> {
        validate_identifier(table)?;
        Ok(Self {
            table: table.into(),
            conn: Arc::new(Mutex::new(store.connect()?)),
        })
    }

    /// The table name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Create the table and its indexes (idempotent).
    pub fn migrate_now(&self) -> outbox_core::Result<()> {
        let t = &self.table;
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        conn.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS {t} (
                consumer TEXT NOT NULL,
                id TEXT NOT NULL,
                state TEXT NOT NULL CHECK (state IN ('started', 'done', 'dead')),
                attempts INTEGER NOT NULL DEFAULT 0,
                first_seen_at INTEGER NOT NULL,
                done_at INTEGER,
                last_error TEXT,
                PRIMARY KEY (consumer, id)
            ) WITHOUT ROWID;
            CREATE INDEX IF NOT EXISTS {t}_seen ON {t} (first_seen_at);
            CREATE TABLE IF NOT EXISTS {t}_dead (
                consumer TEXT NOT NULL,
                id TEXT NOT NULL,
                state TEXT NOT NULL CHECK (state IN ('dead', 'requeued')),
                attempts INTEGER NOT NULL,
                first_seen_at INTEGER NOT NULL,
                dead_at INTEGER NOT NULL,
                error TEXT,
                source TEXT,
                stream TEXT,
                msg_key TEXT,
                content_type TEXT,
                headers TEXT,
                payload BLOB,
                PRIMARY KEY (consumer, id)
            ) WITHOUT ROWID;
            CREATE INDEX IF NOT EXISTS {t}_dead_state ON {t}_dead (consumer, state, dead_at);"
        ))
        .map_err(map_err)
    }

    /// The inbox of consumer `name` with its handler.
    pub fn consumer<H: SqliteHandler>(
        &self,
        name: &str,
        handler: H,
    ) -> outbox_core::Result<SqliteInbox<H>> {
        check_consumer(name)?;
        Ok(SqliteInbox {
            table: self.clone(),
            consumer: name.into(),
            handler: Arc::new(handler),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection, &str) -> outbox_core::Result<T> + Send + 'static,
    ) -> outbox_core::Result<T> {
        let (conn, table) = (self.conn.clone(), self.table.clone());
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut conn, &table).map_err(|e| explain_missing(e, &table))
        })
        .await
        .map_err(|e| Error::store("sqlite inbox worker task failed").with_source(e))?
    }

    /// Dead letters, oldest first (of one consumer, or all), at most `limit`.
    pub async fn dead_letters(
        &self,
        consumer: Option<&str>,
        limit: usize,
    ) -> outbox_core::Result<Vec<InboxDeadLetter>> {
        let consumer = consumer.map(str::to_owned);
        let limit = limit.clamp(1, outbox_core::MAX_PAGE) as i64;
        self.blocking(move |conn, t| {
            let mut stmt = conn
                .prepare(&format!(
                    "SELECT consumer, id, source, stream, msg_key, content_type, headers, payload,
                            attempts, error, first_seen_at
                     FROM {t}_dead WHERE state = 'dead' AND (?1 IS NULL OR consumer = ?1)
                     ORDER BY dead_at, id LIMIT ?2"
                ))
                .map_err(map_err)?;
            let rows = stmt
                .query_map(params![consumer, limit], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, Option<String>>(2)?,
                        r.get::<_, Option<String>>(3)?,
                        r.get::<_, Option<String>>(4)?,
                        r.get::<_, Option<String>>(5)?,
                        r.get::<_, Option<String>>(6)?,
                        r.get::<_, Option<Vec<u8>>>(7)?,
                        r.get::<_, i64>(8)?,
                        r.get::<_, Option<String>>(9)?,
                        r.get::<_, i64>(10)?,
                    ))
                })
                .map_err(map_err)?;
            let mut out = Vec::new();
            for row in rows {
                let (c, id, source, stream, key, ct, headers, payload, attempts, error, seen) =
                    row.map_err(map_err)?;
                out.push(InboxDeadLetter {
                    consumer: c,
                    message: Received::from_stored(&id, source, stream, key, ct, headers, payload)?,
                    attempts: attempts.clamp(0, u32::MAX as i64) as u32,
                    error,
                    first_seen_at: from_millis(seen),
                });
            }
            Ok(out)
        })
        .await
    }

    /// Put a dead letter back for its consumer, which processes it again (attempts from
    /// zero) on its next round. `NotFound` when it is not a dead letter.
    pub async fn requeue(&self, consumer: &str, id: MessageId) -> outbox_core::Result<()> {
        let consumer = consumer.to_owned();
        self.blocking(move |conn, t| {
            let n = conn
                .execute(
                    &format!(
                        "UPDATE {t}_dead SET state = 'requeued' WHERE consumer = ?1 AND id = ?2 AND state = 'dead'"
                    ),
                    params![consumer, id.to_string()],
                )
                .map_err(map_err)?;
            if n == 0 {
                return Err(Error::not_found(format!(
                    "message {id} is not a dead letter of consumer {consumer:?}"
                )));
            }
            Ok(())
        })
        .await
    }

    /// Delete the marks of messages processed more than `older_than` ago, at most `limit`;
    /// returns how many. A message delivered again after its mark is gone would be processed
    /// again: keep marks longer than the broker can redeliver.
    pub async fn clean(&self, older_than: Duration, limit: usize) -> outbox_core::Result<u64> {
        let horizon = to_millis(outbox_core::cutoff("inbox retention", older_than)?);
        let limit = limit.max(1) as i64;
        self.blocking(move |conn, t| {
            conn.execute(
                &format!(
                    "DELETE FROM {t} WHERE (consumer, id) IN
                       (SELECT consumer, id FROM {t} WHERE first_seen_at < ?1 AND state = 'done' LIMIT ?2)"
                ),
                params![horizon, limit],
            )
            .map(|n| n as u64)
            .map_err(map_err)
        })
        .await
    }
}

/// A missing table becomes one clear line.
fn explain_missing(e: Error, table: &str) -> Error {
    if e.to_string().contains("no such table") {
        Error::new(
            outbox_core::ErrorKind::Store,
            outbox_core::Retry::Permanent,
            format!("the inbox table {table} does not exist: run its migration (InboxTable::migrate_now)"),
        )
    } else {
        e
    }
}

/// One consumer's inbox on SQLite: an [`Inbox`] for [`outbox_core::Consumer`].
pub struct SqliteInbox<H> {
    table: InboxTable,
    consumer: Arc<str>,
    handler: Arc<H>,
}

impl<H> std::fmt::Debug for SqliteInbox<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteInbox")
            .field("table", &self.table.table)
            .field("consumer", &self.consumer)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> i64 {
    to_millis(SystemTime::now())
}

#[async_trait]
impl<H: SqliteHandler> Inbox for SqliteInbox<H> {
    fn consumer(&self) -> &str {
        &self.consumer
    }

    async fn start(&self, ids: &[MessageId]) -> outbox_core::Result<Vec<Seen>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let (consumer, ids) = (self.consumer.clone(), ids.to_vec());
        self.table
            .blocking(move |conn, t| {
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(map_err)?;
                let mut out = Vec::with_capacity(ids.len());
                {
                    let mut stmt = tx
                        .prepare_cached(&format!(
                            "INSERT INTO {t} (consumer, id, state, attempts, first_seen_at)
                             VALUES (?1, ?2, 'started', 1, ?3)
                             ON CONFLICT (consumer, id) DO UPDATE SET attempts =
                               CASE WHEN state = 'started' THEN attempts + 1 ELSE attempts END
                             RETURNING state, attempts"
                        ))
                        .map_err(map_err)?;
                    let now = now_ms();
                    for id in &ids {
                        let (state, attempts): (String, i64) = stmt
                            .query_row(params![consumer, id.to_string(), now], |r| {
                                Ok((r.get(0)?, r.get(1)?))
                            })
                            .map_err(map_err)?;
                        out.push(seen(&state, attempts));
                    }
                }
                tx.commit().map_err(map_err)?;
                Ok(out)
            })
            .await
    }

    async fn process(&self, message: &Received) -> outbox_core::Result<Processed> {
        let (consumer, message, handler) =
            (self.consumer.clone(), message.clone(), self.handler.clone());
        self.table
            .blocking(move |conn, t| {
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(map_err)?;
                let now = now_ms();
                let marked = tx
                    .execute(
                        &format!(
                            "INSERT INTO {t} (consumer, id, state, attempts, first_seen_at, done_at)
                             VALUES (?1, ?2, 'done', 1, ?3, ?3)
                             ON CONFLICT (consumer, id) DO UPDATE SET state = 'done',
                               done_at = excluded.done_at, last_error = NULL
                             WHERE state = 'started'"
                        ),
                        params![consumer, message.id.to_string(), now],
                    )
                    .map_err(map_err)?;
                if marked == 0 {
                    return Ok(Processed::Duplicate); // the transaction rolls back on drop
                }
                handler.handle(&tx, &message)?;
                tx.commit().map_err(map_err)?;
                Ok(Processed::Done)
            })
            .await
    }

    /// One transaction: each message marked and handled in order, commit.
    async fn process_batch(
        &self,
        messages: &[&Received],
    ) -> outbox_core::Result<outbox_core::BatchProcessed> {
        use outbox_core::BatchProcessed;
        let (consumer, handler) = (self.consumer.clone(), self.handler.clone());
        let messages: Vec<Received> = messages.iter().map(|m| (*m).clone()).collect();
        self.table
            .blocking(move |conn, t| {
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(map_err)?;
                let now = now_ms();
                let mut out = Vec::with_capacity(messages.len());
                {
                    let mut mark = tx
                        .prepare_cached(&format!(
                            "INSERT INTO {t} (consumer, id, state, attempts, first_seen_at, done_at)
                             VALUES (?1, ?2, 'done', 1, ?3, ?3)
                             ON CONFLICT (consumer, id) DO UPDATE SET state = 'done',
                               done_at = excluded.done_at, last_error = NULL
                             WHERE state = 'started'"
                        ))
                        .map_err(map_err)?;
                    for (index, m) in messages.iter().enumerate() {
                        if mark
                            .execute(params![consumer, m.id.to_string(), now])
                            .map_err(map_err)?
                            == 0
                        {
                            out.push(Processed::Duplicate);
                            continue;
                        }
                        if let Err(error) = handler.handle(&tx, m) {
                            // The transaction rolls back on drop.
                            return Ok(BatchProcessed::Failed { index, error });
                        }
                        out.push(Processed::Done);
                    }
                }
                tx.commit().map_err(map_err)?;
                Ok(BatchProcessed::Committed(out))
            })
            .await
    }

    async fn failed(&self, id: MessageId, error: &str) -> outbox_core::Result<u32> {
        let (consumer, error) = (self.consumer.clone(), error.to_owned());
        self.table
            .blocking(move |conn, t| {
                let attempts: Option<i64> = conn
                    .query_row(
                        &format!(
                            "UPDATE {t} SET last_error = ?3 WHERE consumer = ?1 AND id = ?2
                             RETURNING attempts"
                        ),
                        params![consumer, id.to_string(), error],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(map_err)?;
                Ok(attempts.unwrap_or(1).clamp(0, u32::MAX as i64) as u32)
            })
            .await
    }

    async fn dead_letter(&self, message: &Received, error: &str) -> outbox_core::Result<()> {
        let (consumer, message, error) = (self.consumer.clone(), message.clone(), error.to_owned());
        self.table
            .blocking(move |conn, t| {
                let headers = serde_json::to_string(&message.headers)
                    .map_err(|e| Error::store("cannot encode headers").with_source(e))?;
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(map_err)?;
                let now = now_ms();
                let id = message.id.to_string();
                // Never over a done mark: a message processed meanwhile stays processed.
                let row: Option<(i64, i64)> = tx
                    .query_row(
                        &format!(
                            "INSERT INTO {t} (consumer, id, state, attempts, first_seen_at, last_error)
                             VALUES (?1, ?2, 'dead', 1, ?3, ?4)
                             ON CONFLICT (consumer, id) DO UPDATE SET state = 'dead',
                               last_error = excluded.last_error
                             WHERE state <> 'done'
                             RETURNING attempts, first_seen_at"
                        ),
                        params![consumer, id, now, error],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()
                    .map_err(map_err)?;
                if let Some((attempts, first_seen)) = row {
                    tx.execute(
                        &format!(
                            "INSERT INTO {t}_dead (consumer, id, state, attempts, first_seen_at,
                               dead_at, error, source, stream, msg_key, content_type, headers, payload)
                             VALUES (?1, ?2, 'dead', ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
                             ON CONFLICT (consumer, id) DO UPDATE SET state = 'dead',
                               attempts = excluded.attempts, dead_at = excluded.dead_at,
                               error = excluded.error, source = excluded.source,
                               stream = excluded.stream, msg_key = excluded.msg_key,
                               content_type = excluded.content_type, headers = excluded.headers,
                               payload = excluded.payload"
                        ),
                        params![
                            consumer,
                            id,
                            attempts,
                            first_seen,
                            now,
                            error,
                            message.source,
                            message.stream,
                            message.key,
                            message.content_type,
                            headers,
                            message.payload
                        ],
                    )
                    .map_err(map_err)?;
                }
                tx.commit().map_err(map_err)?;
                Ok(())
            })
            .await
    }

    async fn requeued(&self, limit: usize) -> outbox_core::Result<Vec<Received>> {
        let consumer = self.consumer.clone();
        let limit = limit.max(1) as i64;
        self.table
            .blocking(move |conn, t| {
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(map_err)?;
                let mut out = Vec::new();
                {
                    let mut stmt = tx
                        .prepare(&format!(
                            "DELETE FROM {t}_dead WHERE consumer = ?1 AND id IN (SELECT id FROM {t}_dead
                               WHERE consumer = ?1 AND state = 'requeued' LIMIT ?2)
                             RETURNING id, source, stream, msg_key, content_type, headers, payload"
                        ))
                        .map_err(map_err)?;
                    let rows = stmt
                        .query_map(params![consumer, limit], |r| {
                            Ok((
                                r.get::<_, String>(0)?,
                                r.get::<_, Option<String>>(1)?,
                                r.get::<_, Option<String>>(2)?,
                                r.get::<_, Option<String>>(3)?,
                                r.get::<_, Option<String>>(4)?,
                                r.get::<_, Option<String>>(5)?,
                                r.get::<_, Option<Vec<u8>>>(6)?,
                            ))
                        })
                        .map_err(map_err)?;
                    for row in rows {
                        let (id, source, stream, key, ct, headers, payload) =
                            row.map_err(map_err)?;
                        out.push(Received::from_stored(&id, source, stream, key, ct, headers, payload)?);
                    }
                }
                for m in &out {
                    tx.execute(
                        &format!(
                            "UPDATE {t} SET state = 'started', attempts = 0
                             WHERE consumer = ?1 AND id = ?2"
                        ),
                        params![consumer, m.id.to_string()],
                    )
                    .map_err(map_err)?;
                }
                tx.commit().map_err(map_err)?;
                Ok(out)
            })
            .await
    }
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

#[async_trait]
impl outbox_core::InboxAdmin for InboxTable {
    fn table(&self) -> &str {
        &self.table
    }
    async fn migrate(&self) -> outbox_core::Result<()> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.migrate_now())
            .await
            .map_err(|e| Error::store("sqlite inbox worker task failed").with_source(e))?
    }
    async fn dead_letters(
        &self,
        consumer: Option<&str>,
        limit: usize,
    ) -> outbox_core::Result<Vec<InboxDeadLetter>> {
        InboxTable::dead_letters(self, consumer, limit).await
    }
    async fn requeue(&self, consumer: &str, id: MessageId) -> outbox_core::Result<()> {
        InboxTable::requeue(self, consumer, id).await
    }
    async fn clean(&self, older_than: Duration, limit: usize) -> outbox_core::Result<u64> {
        InboxTable::clean(self, older_than, limit).await
    }
}

impl SqliteStore {
    /// The inbox table `table` in this database (see [`InboxTable`]).
    pub fn inbox_table(&self, table: &str) -> outbox_core::Result<InboxTable> {
        InboxTable::new(self, table)
    }
}
