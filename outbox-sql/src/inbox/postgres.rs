//! The inbox on PostgreSQL.

use super::*;
use sqlx::{Executor, Postgres};

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

/// SQLSTATE `division_by_zero`: what the prepared mark raises for a duplicate.
const DIVISION_BY_ZERO: &str = "22012";
/// SQLSTATE `invalid_sql_statement_name`: `EXECUTE` of a statement this session has not
/// prepared.
const NO_SUCH_STATEMENT: &str = "26000";

/// The prepared mark's name for table `t`: a hash of the name, so two tables never share one.
fn mark_statement(t: &str) -> String {
    // FNV-1a: stable across processes and builds (the name lives on the server).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in t.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("outbox_inbox_mark_{h:016x}")
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::new();
    crate::common::push_hex(&mut out, bytes);
    out
}

impl<H: SqlHandler<Postgres>> SqlInbox<Postgres, H> {
    /// The mark in a round trip of its own, after `BEGIN`: where a prepared statement cannot
    /// be kept.
    async fn process_in_two_trips(&self, message: &Received) -> outbox_core::Result<Processed> {
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

    /// `BEGIN` and the mark in one round trip: the mark is a statement this connection has
    /// prepared (`PREPARE`, planned once per connection), run by an `EXECUTE` sent with the
    /// `BEGIN` as one simple query. A duplicate makes it fail on purpose (`1 / 0` rows
    /// marked), and the transaction is rolled back before the handler runs. Where the prepared
    /// statement cannot be kept (a pooler that moves sessions between server connections), the
    /// mark falls back to its own round trip.
    async fn process(&self, message: &Received) -> outbox_core::Result<Processed> {
        let mut conn = self.table.pool.acquire().await.map_err(map_err)?;
        let t = &self.table.table;
        let name = mark_statement(t);
        let begin = format!(
            "BEGIN; EXECUTE {name}(convert_from(decode('{}', 'hex'), 'UTF8'), '{}', {})",
            hex(self.consumer.as_bytes()),
            message.id,
            now_ms()
        );
        for prepared in [false, true] {
            let error = match sqlx::Connection::begin_with(&mut *conn, begin.clone()).await {
                Ok(mut tx) => {
                    self.handler.handle(&mut tx, message).await?;
                    tx.commit().await.map_err(map_err)?;
                    return Ok(Processed::Done);
                }
                Err(e) => e,
            };
            // The transaction may be open and aborted: end it, or close the connection
            // rather than pool it in that state.
            if conn.execute("ROLLBACK").await.is_err() {
                conn.close_on_drop();
                return Err(self.table.explain(error));
            }
            match &error {
                sqlx::Error::Database(db) if db.code().as_deref() == Some(DIVISION_BY_ZERO) => {
                    return Ok(Processed::Duplicate)
                }
                // Not prepared on this connection yet: prepare it and try once more.
                sqlx::Error::Database(db)
                    if db.code().as_deref() == Some(NO_SUCH_STATEMENT) && !prepared =>
                {
                    let prepare = format!(
                        "PREPARE {name} (text, uuid, int8) AS
                         WITH marked AS (
                           INSERT INTO {t} AS i (consumer, id, state, attempts, first_seen_at, done_at)
                           VALUES ($1, $2, 'done', 1, $3, $3)
                           ON CONFLICT (consumer, id) DO UPDATE SET state = 'done',
                             done_at = EXCLUDED.done_at, last_error = NULL
                           WHERE i.state = 'started'
                           RETURNING 1)
                         SELECT 1 / count(*) FROM marked"
                    );
                    if let Err(e) = conn.execute(prepare.as_str()).await {
                        let exists = matches!(&e, sqlx::Error::Database(db) if db.code().as_deref() == Some("42P05"));
                        if !exists {
                            return Err(self.table.explain(e));
                        }
                    }
                }
                sqlx::Error::Database(db) if db.code().as_deref() == Some(NO_SUCH_STATEMENT) => {
                    break;
                }
                _ => return Err(self.table.explain(error)),
            }
        }
        drop(conn);
        self.process_in_two_trips(message).await
    }

    /// One transaction: every message marked in one statement (ids sorted, so two batches
    /// never wait for each other in a cycle), then the handler for each one marked, commit.
    async fn process_batch(
        &self,
        messages: &[&Received],
    ) -> outbox_core::Result<outbox_core::BatchProcessed> {
        use outbox_core::BatchProcessed;
        if messages.is_empty() {
            return Ok(BatchProcessed::Committed(Vec::new()));
        }
        let t = &self.table.table;
        let ids: Vec<MessageId> = messages.iter().map(|m| m.id).collect();
        let mut tx = self.table.pool.begin().await.map_err(map_err)?;
        let now = now_ms();
        let marked: Vec<String> = sqlx::query_scalar(&format!(
            "INSERT INTO {t} AS i (consumer, id, state, attempts, first_seen_at, done_at)
             SELECT $1, u::uuid, 'done', 1, $3, $3 FROM unnest($2::text[]) AS u
             ON CONFLICT (consumer, id) DO UPDATE SET state = 'done',
               done_at = EXCLUDED.done_at, last_error = NULL
             WHERE i.state = 'started'
             RETURNING id::text"
        ))
        .bind(&*self.consumer)
        .bind(distinct_sorted(&ids))
        .bind(now)
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| self.table.explain(e))?;
        let mut todo: std::collections::HashSet<String> = marked.into_iter().collect();
        let mut out = Vec::with_capacity(messages.len());
        for (index, m) in messages.iter().enumerate() {
            if !todo.remove(&m.id.to_string()) {
                out.push(Processed::Duplicate);
                continue;
            }
            if let Err(error) = self.handler.handle(&mut tx, m).await {
                return Ok(BatchProcessed::Failed { index, error }); // rolled back on drop
            }
            out.push(Processed::Done);
        }
        tx.commit().await.map_err(map_err)?;
        Ok(BatchProcessed::Committed(out))
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
