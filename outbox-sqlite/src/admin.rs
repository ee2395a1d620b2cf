//! What operators do with a SQLite outbox (StoreAdmin): counts, listings, requeue, purge, parked units, cleaning, the schema report.

use super::*;

#[async_trait]
impl StoreAdmin for SqliteStore {
    async fn schema(&self) -> outbox_core::Result<outbox_core::SchemaReport> {
        let t = self.table().to_owned();
        let names =
            |list: &[&str]| -> Vec<String> { list.iter().map(|n| n.replace("{t}", &t)).collect() };
        // What the schema statements make, and what migrate drops of older versions.
        let expected = names(&[
            "{t}",
            "{t}_due",
            "{t}_unit",
            "{t}_oc",
            "{t}_sent",
            "{t}_dead",
            "{t}_due_next",
            "{t}_due_parked",
        ]);
        let legacy = names(&["{t}_claim", "{t}_leased", "{t}_backoff"]);
        // On the blocking pool, as every statement of this store.
        let exists = |name: String| {
            self.blocking(move |conn, _| {
                let n: i64 = conn
                    .query_row(
                        "SELECT COUNT(*) FROM sqlite_master WHERE type IN ('table', 'index') AND name = ?1",
                        [name],
                        |r| r.get(0),
                    )
                    .map_err(map_err)?;
                Ok(n > 0)
            })
        };
        let version = || {
            self.blocking(|conn, sql| {
                conn.query_row(
                    &format!("SELECT max(version) FROM {}_schema", sql.table),
                    [],
                    |r| r.get(0),
                )
                .map_err(map_err)
            })
        };
        outbox_core::SchemaReport::check(&t, &expected, &legacy, exists, version).await
    }

    async fn requeue(&self, selector: &Selector) -> outbox_core::Result<u64> {
        let (clause, mut args) = selector_clause(selector);
        let n = self
            .blocking(move |conn, sql| {
                let now_idx = args.len() + 1;
                args.push(rusqlite::types::Value::Integer(to_millis(SystemTime::now())));
                let t = &sql.table;
                // Keep-order rows come back to their unit, which becomes due.
                let text = format!(
                    "UPDATE {t} SET status = 'pending', attempts = 0, next_attempt_at = ?{now_idx}, locked_by = NULL,
                       locked_until = NULL WHERE status = 'dead'{clause}
                     RETURNING stream, okey, strategy <> 'on_commit'"
                );
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(map_err)?;
                let rows: Vec<(rusqlite::types::Value, rusqlite::types::Value, bool)> = {
                    let mut stmt = tx.prepare(&text).map_err(map_err)?;
                    stmt.query_map(params_from_iter(args), |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                        .and_then(|rows| rows.collect())
                        .map_err(map_err)?
                };
                {
                    let mut due = tx
                        .prepare_cached(&format!(
                            "INSERT INTO {t}_due (stream, okey, next_at) VALUES (?1, ?2, ?3)
                             ON CONFLICT (stream, okey) DO UPDATE SET next_at = CASE WHEN parked_at IS NULL
                               THEN MIN(next_at, excluded.next_at) ELSE next_at END"
                        ))
                        .map_err(map_err)?;
                    let now = to_millis(SystemTime::now());
                    for (stream, key, _) in rows.iter().filter(|r| r.2) {
                        due.execute(params![stream, key, now]).map_err(map_err)?;
                    }
                }
                tx.commit().map_err(map_err)?;
                Ok(rows.len() as u64)
            })
            .await?;
        self.shared.notify.notify_one();
        Ok(n)
    }

    async fn resume_unit(&self, stream: &str, unit: &str) -> outbox_core::Result<()> {
        let (stream, unit) = (stream.to_owned(), unit.to_owned());
        self.blocking(move |conn, sql| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(map_err)?;
            resume(&tx, &sql.table, &stream, &unit)?;
            tx.commit().map_err(map_err)
        })
        .await?;
        self.shared.notify.notify_one();
        Ok(())
    }

    async fn skip_head(&self, stream: &str, unit: &str) -> outbox_core::Result<Option<i64>> {
        let (stream, unit) = (stream.to_owned(), unit.to_owned());
        let head = self
            .blocking(move |conn, sql| {
                let t = &sql.table;
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(map_err)?;
                let parked: bool = tx
                    .query_row(
                        &format!(
                            "SELECT count(*) > 0 FROM {t}_due WHERE stream = ?1 AND okey = ?2 AND parked_at IS NOT NULL"
                        ),
                        params![stream, unit],
                        |r| r.get(0),
                    )
                    .map_err(map_err)?;
                if !parked {
                    return Err(outbox_core::no_such_unit(&stream, &unit, true));
                }
                let head: Option<i64> = tx
                    .query_row(
                        &format!(
                            "UPDATE {t} SET status = 'dead', locked_by = NULL, locked_until = NULL,
                               last_error = COALESCE(last_error || ' ', '') || '[skipped by an operator]'
                             WHERE seq = (SELECT seq FROM {t} WHERE status = 'pending' AND stream = ?1
                               AND okey = ?2 AND strategy <> 'on_commit' ORDER BY seq LIMIT 1)
                             RETURNING seq"
                        ),
                        params![stream, unit],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(map_err)?;
                resume(&tx, t, &stream, &unit)?;
                tx.commit().map_err(map_err)?;
                Ok(head)
            })
            .await?;
        self.shared.notify.notify_one();
        Ok(head)
    }

    async fn parked_units(
        &self,
        stream: Option<&str>,
        limit: usize,
    ) -> outbox_core::Result<Vec<outbox_core::ParkedUnit>> {
        let stream = stream.map(str::to_owned);
        self.blocking(move |conn, sql| {
            let t = &sql.table;
            let text = format!(
                "SELECT d.stream, d.okey, d.parked_at, d.parked_reason,
                   (SELECT seq FROM {t} o WHERE o.status = 'pending' AND o.stream = d.stream AND o.okey = d.okey
                      AND o.strategy <> 'on_commit' ORDER BY o.seq LIMIT 1),
                   (SELECT count(*) FROM (SELECT 1 FROM {t} o WHERE o.status = 'pending' AND o.stream = d.stream
                      AND o.okey = d.okey AND o.strategy <> 'on_commit' LIMIT {cap}))
                 FROM {t}_due d WHERE d.parked_at IS NOT NULL AND (?1 IS NULL OR d.stream = ?1)
                 ORDER BY d.parked_at LIMIT ?2",
                cap = outbox_core::PARKED_COUNT_CAP
            );
            let mut stmt = conn.prepare_cached(&text).map_err(map_err)?;
            let rows = stmt
                .query_map(params![stream, limit.min(i64::MAX as usize) as i64], |r| {
                    Ok(outbox_core::ParkedUnit {
                        stream: r.get(0)?,
                        unit: r.get(1)?,
                        parked_at: from_millis(r.get(2)?),
                        reason: r.get(3)?,
                        head: r.get(4)?,
                        pending: r.get::<_, i64>(5)?.max(0) as u64,
                    })
                })
                .and_then(|rows| rows.collect())
                .map_err(map_err)?;
            Ok(rows)
        })
        .await
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
                "SELECT {cols} FROM {} WHERE status = 'dead' AND (?1 IS NULL OR stream = ?1) ORDER BY created_at, seq LIMIT ?2",
                sql.table,
                cols = cols("payload")
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

    async fn messages(
        &self,
        f: &outbox_core::MessageFilter,
    ) -> outbox_core::Result<Vec<StoredMessage>> {
        use rusqlite::types::Value;
        f.validate()?;
        let mut clause = String::new();
        let mut values: Vec<Value> = Vec::new();
        let mut add = |condition: &str, value: Value| {
            values.push(value);
            clause.push_str(&format!(" AND {condition} ?{}", values.len()));
        };
        if let Some(s) = &f.stream {
            add("stream =", Value::Text(s.clone()));
        }
        if let Some(s) = f.status {
            add("status =", Value::Text(s.as_str().to_owned()));
        }
        if let Some(k) = &f.key {
            add("msg_key =", Value::Text(k.clone()));
        }
        if let Some(id) = f.id {
            add("id =", Value::Text(id.to_string()));
        }
        if let Some(d) = &f.destination {
            add("destination =", Value::Text(d.clone()));
        }
        if let Some(b) = f.before {
            add("seq <", Value::Integer(b));
        }
        let limit = f.limit;
        self.blocking(move |conn, sql| {
            let text = format!(
                "SELECT {cols} FROM {} WHERE 1 = 1{clause} ORDER BY seq DESC LIMIT {limit}",
                sql.table,
                cols = cols("payload")
            );
            let mut stmt = conn.prepare(&text).map_err(map_err)?;
            let rows = stmt
                .query_map(params_from_iter(values), listed_row)
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(map_err)?;
            Ok(rows)
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
}
