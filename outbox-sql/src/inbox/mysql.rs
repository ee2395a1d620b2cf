//! The inbox on MySQL / MariaDB.

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
        let mut conn = self.table.pool.acquire().await.map_err(map_err)?;
        let mut tx = conn.begin().await.map_err(map_err)?;
        if !self
            .mark(&mut tx, &message.id.to_string(), now_ms())
            .await?
        {
            return Ok(Processed::Duplicate);
        }
        self.handler.handle(&mut tx, message).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(Processed::Done)
    }

    /// One transaction: every message marked first, in id order (two batches never wait
    /// for each other in a cycle), then the handler for each one marked, commit.
    async fn process_batch(
        &self,
        messages: &[&Received],
    ) -> outbox_core::Result<outbox_core::BatchProcessed> {
        use outbox_core::BatchProcessed;
        if messages.is_empty() {
            return Ok(BatchProcessed::Committed(Vec::new()));
        }
        let ids: Vec<MessageId> = messages.iter().map(|m| m.id).collect();
        let mut conn = self.table.pool.acquire().await.map_err(map_err)?;
        let mut tx = conn.begin().await.map_err(map_err)?;
        let now = now_ms();
        let mut todo = std::collections::HashSet::new();
        for id in distinct_sorted(&ids) {
            if self.mark(&mut tx, &id, now).await? {
                todo.insert(id);
            }
        }
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

impl<H: SqlHandler<MySql>> SqlInbox<MySql, H> {
    /// Mark message `id` done in `tx` unless it is already done or dead; whether it was.
    async fn mark(
        &self,
        tx: &mut sqlx::MySqlConnection,
        id: &str,
        now: i64,
    ) -> outbox_core::Result<bool> {
        let t = &self.table.table;
        // A locking read of the latest version: a second delivery under way waits here
        // until the first commits, then finds the row done.
        let mut marked = sqlx::query(&format!(
            "UPDATE {t} SET state = 'done', done_at = ?, last_error = NULL
             WHERE consumer = ? AND id = ? AND state = 'started'"
        ))
        .bind(now)
        .bind(&*self.consumer)
        .bind(id)
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
            .bind(id)
            .bind(now)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?
            .rows_affected();
        }
        Ok(marked > 0)
    }
}
