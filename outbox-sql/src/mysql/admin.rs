//! What operators do with a MySQL / MariaDB outbox (StoreAdmin): counts, listings, requeue, purge, parked units, cleaning, the schema report.

use super::*;

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
        let exists = |name: String| async move {
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
        };
        let t = &self.inner.table;
        let version = || async {
            sqlx::query_scalar::<_, Option<i64>>(&format!(
                "SELECT CAST(max(version) AS SIGNED) FROM {t}_schema"
            ))
            .fetch_one(&self.inner.pool)
            .await
            .map_err(map_err)
        };
        outbox_core::SchemaReport::check(t, &expected, &legacy, exists, version).await
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
            "SELECT {cols} FROM {} WHERE 1 = 1{clause} ORDER BY seq DESC LIMIT {}",
            self.inner.table,
            f.limit,
            cols = cols("payload")
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
            "SELECT {cols} FROM {} WHERE status = 'dead' AND (? IS NULL OR stream = ?) ORDER BY created_at, seq LIMIT ?",
            self.inner.table,
            cols = cols("payload")
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
        let sql = format!(
            "SELECT {} FROM {} WHERE seq = ?",
            cols("payload"),
            self.inner.table
        );
        let row = sqlx::query(&sql)
            .bind(seq)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(map_err)?;
        row.as_ref().map(listed).transpose()
    }
}
