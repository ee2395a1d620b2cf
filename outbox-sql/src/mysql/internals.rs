//! The MySQL store's machinery behind claims, settles, the adoption of unknown units and
//! migration (statements bounded by `lock_timeout`, the unit lock rows, collations).

use super::*;

impl MySqlStore {
    /// Make sure each unit has its row of `<table>_locks` before a writer's transaction locks
    /// it, creating missing ones on connections of their own, each insert committed at once
    /// (`due = 0`: the writer's lock makes the unit known to claims). A lock row created
    /// inside a writer's transaction deadlocks when that transaction rolls back: the writers
    /// waiting on the new row inherit locks on the gap it leaves, and each then waits for the
    /// other's to insert it. An existing row is locked without a gap. Lock rows are never
    /// deleted, so a unit seen once needs no look-up again.
    pub(super) async fn ensure_lock_rows(&self, units: &[Unit]) -> outbox_core::Result<()> {
        let unknown: Vec<&Unit> = {
            let known = self.inner.known.lock().unwrap_or_else(|p| p.into_inner());
            units.iter().filter(|u| !known.contains(*u)).collect()
        };
        if unknown.is_empty() {
            return Ok(());
        }
        let t = &self.inner.table;
        let side = self
            .inner
            .side
            .get_or_try_init(|| async {
                let options = self.inner.pool.connect_options().as_ref().clone();
                Ok::<_, Error>(
                    MySqlPoolOptions::new()
                        .max_connections(2)
                        .min_connections(0)
                        .acquire_timeout(self.inner.pool.options().get_acquire_timeout())
                        .connect_lazy_with(options),
                )
            })
            .await?;
        for (stream, key) in unknown {
            // A plain read first: an insert that met an existing row would wait for the
            // writer holding it.
            let exists: Option<i64> = sqlx::query_scalar(&format!(
                "SELECT 1 FROM {t}_locks WHERE stream = ? AND okey = ?"
            ))
            .bind(stream)
            .bind(key)
            .fetch_optional(side)
            .await
            .map_err(map_err)?;
            if exists.is_none() {
                sqlx::query(&format!(
                    "INSERT IGNORE INTO {t}_locks (stream, okey, due) VALUES (?, ?, 0)"
                ))
                .bind(stream)
                .bind(key)
                .execute(side)
                .await
                .map_err(map_err)?;
            }
            let mut known = self.inner.known.lock().unwrap_or_else(|p| p.into_inner());
            if known.len() >= KNOWN_UNITS {
                known.clear();
            }
            known.insert((stream.clone(), key.clone()));
        }
        Ok(())
    }

    /// Un-park (`stream`, `unit`) in `tx`: due now, its failed rows with a fresh retry budget.
    pub(super) async fn resume(
        &self,
        tx: &mut Transaction<'_, MySql>,
        stream: &str,
        unit: &str,
    ) -> outbox_core::Result<()> {
        let t = &self.inner.table;
        let resumed = sqlx::query(&format!(
            "UPDATE {t}_due SET parked_at = NULL, parked_reason = NULL, next_at = {NOW}, leased_by = NULL,
               claims = 0
             WHERE stream = ? AND okey = ? AND parked_at IS NOT NULL"
        ))
        .bind(stream)
        .bind(unit)
        .execute(&mut **tx)
        .await
        .map_err(map_err)?
        .rows_affected();
        if resumed == 0 {
            return Err(outbox_core::no_such_unit(stream, unit, true));
        }
        sqlx::query(&format!(
            "UPDATE {t} SET attempts = 0, next_attempt_at = LEAST(next_attempt_at, {NOW})
             WHERE status = 'pending' AND stream = ? AND okey = ? AND strategy <> 'on_commit' AND attempts > 0"
        ))
        .bind(stream)
        .bind(unit)
        .execute(&mut **tx)
        .await
        .map_err(map_err)?;
        Ok(())
    }

    /// The server's NO PAD binary collation: names compare byte for byte, so `a` and `a `
    /// (and `a` and `A`, `é` and `e` + combining accent) are different streams and units.
    /// `utf8mb4_bin` is PAD SPACE: `=` and unique keys ignore trailing spaces.
    /// The tables `migrate` creates for a new outbox, for a DBA to review and run as their
    /// owner (`outbox migrate --print-sql`); the server is asked which exact collation it
    /// has. Upgrading an existing table (columns added later, indexes converted) is
    /// `migrate`'s work, run as the owner.
    pub async fn schema_sql(&self) -> outbox_core::Result<Vec<String>> {
        let c = self.exact_collation().await?;
        Ok(create_tables(&self.inner.table, c).to_vec())
    }

    pub(super) async fn exact_collation(&self) -> outbox_core::Result<&'static str> {
        Ok(if self.is_mariadb().await? {
            "utf8mb4_nopad_bin"
        } else {
            "utf8mb4_0900_bin"
        })
    }

    pub(super) async fn is_mariadb(&self) -> outbox_core::Result<bool> {
        self.inner
            .mariadb
            .get_or_try_init(|| async {
                let version: String = sqlx::query_scalar("SELECT VERSION()")
                    .fetch_one(&self.inner.pool)
                    .await
                    .map_err(map_err)?;
                Ok(version.to_ascii_lowercase().contains("mariadb"))
            })
            .await
            .copied()
    }

    /// `statement` (an `UPDATE`, `INSERT` or `SELECT`) waiting at most `lock_timeout` for a
    /// row lock.
    pub(super) async fn bounded(&self, statement: &str) -> outbox_core::Result<String> {
        let secs = self.inner.lock_timeout.as_secs_f64().ceil().max(1.0) as u64;
        Ok(if self.is_mariadb().await? {
            format!("SET STATEMENT innodb_lock_wait_timeout = {secs} FOR {statement}")
        } else {
            let (verb, rest) = statement.split_at(statement.find(' ').unwrap_or(0));
            format!("{verb} /*+ SET_VAR(innodb_lock_wait_timeout = {secs}) */{rest}")
        })
    }

    /// `ALTER TABLE table {ddl}` unless `table` has `column` (MySQL 8 has no ADD COLUMN IF
    /// NOT EXISTS; a concurrent migrate that added it first is fine).
    pub(super) async fn add_column(
        &self,
        table: &str,
        column: &str,
        ddl: &str,
    ) -> outbox_core::Result<()> {
        let has: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.COLUMNS
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND COLUMN_NAME = ?",
        )
        .bind(table)
        .bind(column)
        .fetch_one(&self.inner.pool)
        .await
        .map_err(map_err)?;
        if has > 0 {
            return Ok(());
        }
        match sqlx::query(&format!("ALTER TABLE {table} {ddl}"))
            .execute(&self.inner.pool)
            .await
        {
            Ok(_) => Ok(()),
            // Duplicate column or key: another migrate was first.
            Err(sqlx::Error::Database(db))
                if db
                    .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
                    .is_some_and(|e| matches!(e.number(), 1060 | 1061)) =>
            {
                Ok(())
            }
            Err(e) => Err(map_err(e)),
        }
    }

    pub(super) async fn index_exists(&self, name: &str) -> outbox_core::Result<bool> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.STATISTICS
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND INDEX_NAME = ?",
        )
        .bind(&self.inner.table)
        .bind(name)
        .fetch_one(&self.inner.pool)
        .await
        .map_err(map_err)?;
        Ok(n > 0)
    }

    /// Keep-order rows whose unit the claim does not know (written by an older version, by
    /// SQL, or moved to another unit by hand) get their unit rows: the distinct units of
    /// `<table>_unit` (a loose index scan, never the rows). On the first claim, then at most
    /// once every [`ADOPT_EVERY`], or now when `force`.
    pub(super) async fn adopt_orphans(&self, force: bool) -> outbox_core::Result<()> {
        {
            let last = self.inner.adopted.lock().unwrap_or_else(|p| p.into_inner());
            if !force && last.is_some_and(|t| t.elapsed() < ADOPT_EVERY) {
                return Ok(());
            }
        }
        let t = &self.inner.table;
        let orphans: Vec<Unit> = sqlx::query_as(&format!(
            "SELECT CONVERT(w.stream USING utf8mb4), CONVERT(w.okey USING utf8mb4)
             FROM (SELECT DISTINCT stream, okey FROM {t} WHERE status = 'pending') w
             WHERE NOT EXISTS (SELECT 1 FROM {t}_due d WHERE d.stream = w.stream AND d.okey = w.okey)
               AND EXISTS (SELECT 1 FROM {t} o WHERE o.status = 'pending' AND o.stream = w.stream
                           AND o.okey = w.okey AND o.strategy <> 'on_commit')"
        ))
        .fetch_all(&self.inner.pool)
        .await
        .map_err(map_err)?;
        // A writer holding one of these units is waited for no longer than a claim would
        // (not the server's innodb_lock_wait_timeout, 50 s by default).
        let statements = [
            self.bounded(&format!(
                "INSERT INTO {t}_locks (stream, okey) VALUES (?, ?) ON DUPLICATE KEY UPDATE due = 1"
            ))
            .await?,
            self.bounded(&format!(
                "INSERT IGNORE INTO {t}_due (stream, okey, next_at) VALUES (?, ?, 0)"
            ))
            .await?,
        ];
        for (stream, key) in &orphans {
            for sql in &statements {
                sqlx::query(sql)
                    .bind(stream)
                    .bind(key)
                    .execute(&self.inner.pool)
                    .await
                    .map_err(map_err)?;
            }
        }
        if !force {
            *self.inner.adopted.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(std::time::Instant::now());
        }
        Ok(())
    }

    /// One claim transaction: lock due units (SKIP LOCKED: a unit is claimed by one relay at a
    /// time), read each unit's first rows through `<table>_unit` (a blocked unit's rows are
    /// never read) and the due publish-on-commit rows through `<table>_oc`, take them in `seq`
    /// order within the limit and the byte budget, lease them and their units. Returns the
    /// rows and the units that had no pending row.
    pub(super) async fn claim_once(
        &self,
        claim: &Claim,
    ) -> outbox_core::Result<(Vec<outbox_core::Claimed>, Vec<Unit>)> {
        let t = &self.inner.table;
        let mut conn = self.inner.pool.acquire().await.map_err(map_err)?;
        // Each statement sees the latest committed rows.
        sqlx::query("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            .execute(&mut *conn)
            .await
            .map_err(map_err)?;
        let update_rows = self
            .bounded(&format!(
                "UPDATE {t} SET locked_by = ?, locked_until = ?, next_attempt_at = ?, claims = claims + 1 WHERE seq IN "
            ))
            .await?;
        let mut tx = sqlx::Connection::begin(&mut *conn).await.map_err(map_err)?;
        let (filter, streams) = match &claim.streams {
            StreamFilter::All => (String::new(), vec![]),
            StreamFilter::Only(s) => (format!(" AND stream IN ({})", list(s.len())), s.clone()),
        };
        let now: i64 = sqlx::query_scalar(&format!("SELECT {NOW}"))
            .fetch_one(&mut *tx)
            .await
            .map_err(map_err)?;
        let due = format!(
            "SELECT CONVERT(stream USING utf8mb4), CONVERT(okey USING utf8mb4), claims FROM {t}_due
             WHERE next_at <= ?{filter} ORDER BY next_at LIMIT ? FOR UPDATE SKIP LOCKED"
        );
        let mut q = sqlx::query_as::<_, (String, String, i64)>(&due).bind(now);
        for s in &streams {
            q = q.bind(s);
        }
        // Each unit's claims without an outcome so far (this claim adds one when it takes rows).
        let (units, unit_claims): (Vec<Unit>, Vec<i64>) = q
            .bind(claim.limit as i64)
            .fetch_all(&mut *tx)
            .await
            .map_err(map_err)?
            .into_iter()
            .map(|(s, k, n)| ((s, k), n))
            .unzip();
        let mut candidates: Vec<Candidate> = Vec::new();
        let mut seen = vec![false; units.len()];
        if !units.is_empty() {
            let per = (claim.limit / units.len()).max(1) as i64;
            let one = format!(
                "(SELECT seq, CONVERT(stream USING utf8mb4), CONVERT(okey USING utf8mb4),
                   CAST(LENGTH(payload) + LENGTH(headers) AS SIGNED),
                   CASE WHEN locked_until > ? THEN 0 WHEN next_attempt_at > ? THEN next_attempt_at END
                 FROM {t} WHERE status = 'pending' AND stream = ? AND okey = ? AND strategy <> 'on_commit'
                 ORDER BY seq LIMIT ?)"
            );
            let sql = vec![one.as_str(); units.len()].join(" UNION ALL ");
            let mut q = sqlx::query_as::<_, (i64, String, String, i64, Option<i64>)>(&sql);
            for (stream, key) in &units {
                q = q.bind(now).bind(now).bind(stream).bind(key).bind(per);
            }
            let index: std::collections::HashMap<&Unit, usize> =
                units.iter().enumerate().map(|(i, u)| (u, i)).collect();
            for (seq, stream, key, size, blocked) in q.fetch_all(&mut *tx).await.map_err(map_err)? {
                let unit = index.get(&(stream, key)).copied();
                if let Some(u) = unit {
                    seen[u] = true;
                }
                candidates.push(Candidate {
                    seq,
                    unit,
                    size: size.max(0) as usize,
                    blocked,
                });
            }
        }
        // A unit yields its rows before its first blocked one.
        candidates.sort_by_key(|c| c.seq);
        let mut stopped = vec![None::<i64>; units.len()];
        candidates.retain(|c| match (c.unit, c.blocked) {
            (Some(u), _) if stopped[u].is_some() => false,
            (Some(u), Some(until)) => {
                stopped[u] = Some(until);
                false
            }
            _ => true,
        });
        let on_commit = format!(
            "SELECT seq, CAST(LENGTH(payload) + LENGTH(headers) AS SIGNED) FROM {t}
             WHERE strategy = 'on_commit' AND status = 'pending' AND next_attempt_at <= ?
               AND (locked_until IS NULL OR locked_until <= ?){filter}
             ORDER BY next_attempt_at LIMIT ? FOR UPDATE SKIP LOCKED"
        );
        let mut q = sqlx::query_as::<_, (i64, i64)>(&on_commit)
            .bind(now)
            .bind(now);
        for s in &streams {
            q = q.bind(s);
        }
        for (seq, size) in q
            .bind(claim.limit as i64)
            .fetch_all(&mut *tx)
            .await
            .map_err(map_err)?
        {
            candidates.push(Candidate {
                seq,
                unit: None,
                size: size.max(0) as usize,
                blocked: None,
            });
        }
        candidates.sort_by_key(|c| c.seq);
        candidates.truncate(claim.limit);
        let sizes: Vec<usize> = candidates.iter().map(|c| c.size).collect();
        let fits = claim.within_budget(&sizes);
        let taken: Vec<&Candidate> = candidates
            .iter()
            .zip(fits)
            .take_while(|(_, fits)| *fits)
            .map(|(c, _)| c)
            .collect();
        let mut rows = Vec::with_capacity(taken.len());
        if !taken.is_empty() {
            let load = format!(
                "SELECT {cols}, CAST(LENGTH(payload) + LENGTH(headers) AS SIGNED), claims + 1 FROM {t}
                 WHERE seq IN ({}) ORDER BY seq",
                list(taken.len()),
                cols = COLS.replacen(
                    "payload,",
                    "CASE WHEN LENGTH(payload) > ? THEN NULL ELSE payload END,",
                    1
                )
            );
            let mut q = sqlx::query(&load).bind(claim.max_row_bytes as i64);
            for c in &taken {
                q = q.bind(c.seq);
            }
            for row in q.fetch_all(&mut *tx).await.map_err(map_err)? {
                rows.push(claimed(&row, claim)?);
            }
            // Keep-order rows count their unit's claims.
            let unit_of: std::collections::HashMap<i64, usize> = taken
                .iter()
                .filter_map(|c| c.unit.map(|u| (c.seq, u)))
                .collect();
            for m in rows.iter_mut().flatten() {
                if let Some(&u) = unit_of.get(&m.seq) {
                    m.claims = (unit_claims[u] + 1).clamp(0, u32::MAX as i64) as u32;
                }
            }
            // Publish-on-commit rows carry their own lease (locked with SKIP LOCKED above);
            // keep-order rows are leased through their unit (no row is rewritten).
            let until = now + claim.lease.as_millis() as i64;
            let on_commit: Vec<i64> = taken
                .iter()
                .filter(|c| c.unit.is_none())
                .map(|c| c.seq)
                .collect();
            if !on_commit.is_empty() {
                let update = format!("{update_rows}({})", list(on_commit.len()));
                let mut q = sqlx::query(&update)
                    .bind(&claim.owner)
                    .bind(until)
                    .bind(until);
                for seq in &on_commit {
                    q = q.bind(seq);
                }
                q.execute(&mut *tx).await.map_err(map_err)?;
            }
            // The units rows were taken from are leased with them.
            let mut leased: Vec<usize> = taken.iter().filter_map(|c| c.unit).collect();
            leased.sort_unstable();
            leased.dedup();
            if !leased.is_empty() {
                let sql = format!(
                    "UPDATE {} SET d.next_at = ?, d.leased_by = ?, d.claims = d.claims + 1",
                    units_join(t, leased.len())
                );
                let mut q = sqlx::query(&sql);
                for &u in &leased {
                    q = q.bind(&units[u].0).bind(&units[u].1);
                }
                q.bind(until)
                    .bind(&claim.owner)
                    .execute(&mut *tx)
                    .await
                    .map_err(map_err)?;
            }
            for &u in &leased {
                stopped[u] = None;
            }
        }
        // A unit whose head backs off is due at the head's retry time.
        for (u, until) in stopped.iter().enumerate() {
            if let Some(until) = until.filter(|&until| until > 0) {
                sqlx::query(&format!(
                    "UPDATE {t}_due SET next_at = ? WHERE stream = ? AND okey = ?"
                ))
                .bind(until)
                .bind(&units[u].0)
                .bind(&units[u].1)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
            }
        }
        tx.commit().await.map_err(map_err)?;
        let empty = units
            .into_iter()
            .zip(seen)
            .filter(|(_, seen)| !seen)
            .map(|(u, _)| u)
            .collect();
        Ok((rows, empty))
    }

    /// Forget units a claim found with no pending row: under the units' writer locks (skipping
    /// a unit a writer holds: it is not empty for long), a fresh read confirms each is still
    /// empty before its row of `<table>_due` goes and its lock row says `due = 0`.
    pub(super) async fn forget_empty_units(&self, units: &[Unit]) -> outbox_core::Result<()> {
        let t = &self.inner.table;
        let mut conn = self.inner.pool.acquire().await.map_err(map_err)?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            .execute(&mut *conn)
            .await
            .map_err(map_err)?;
        let mut tx = sqlx::Connection::begin(&mut *conn).await.map_err(map_err)?;
        for (stream, key) in units {
            let locked: Option<i64> = sqlx::query_scalar(&format!(
                "SELECT 1 FROM {t}_locks WHERE stream = ? AND okey = ? FOR UPDATE SKIP LOCKED"
            ))
            .bind(stream)
            .bind(key)
            .fetch_optional(&mut *tx)
            .await
            .map_err(map_err)?;
            if locked.is_none() {
                continue;
            }
            let pending: Option<i64> = sqlx::query_scalar(&format!(
                "SELECT seq FROM {t} WHERE status = 'pending' AND stream = ? AND okey = ?
                   AND strategy <> 'on_commit' LIMIT 1"
            ))
            .bind(stream)
            .bind(key)
            .fetch_optional(&mut *tx)
            .await
            .map_err(map_err)?;
            if pending.is_some() {
                continue;
            }
            // The lock row stays (see `lock_units`), marked as not known to claims.
            for statement in [
                format!("DELETE FROM {t}_due WHERE stream = ? AND okey = ?"),
                format!("UPDATE {t}_locks SET due = 0 WHERE stream = ? AND okey = ?"),
            ] {
                sqlx::query(&statement)
                    .bind(stream)
                    .bind(key)
                    .execute(&mut *tx)
                    .await
                    .map_err(map_err)?;
            }
        }
        tx.commit().await.map_err(map_err)
    }

    /// A batch's outcome in one transaction: the units first (a unit whose head failed gets
    /// its retry time, the others are free again; only while `owner` still holds them, any
    /// holder for `complete`), then the published rows, then the failures.
    pub(super) async fn settle_rows(
        &self,
        owner: Option<&str>,
        done: &[i64],
        delete: bool,
        failures: &[Failure],
    ) -> outbox_core::Result<()> {
        if done.is_empty() && failures.is_empty() {
            return Ok(());
        }
        let t = &self.inner.table;
        let mut conn = self.inner.pool.acquire().await.map_err(map_err)?;
        // No gap locks: writers inserting a new unit's rows never wait on (or deadlock with)
        // a settle; every lock below is a row found by its primary key.
        sqlx::query("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            .execute(&mut *conn)
            .await
            .map_err(map_err)?;
        let mut tx = sqlx::Connection::begin(&mut *conn).await.map_err(map_err)?;
        let all: Vec<i64> = done
            .iter()
            .copied()
            .chain(failures.iter().map(|f| f.seq))
            .collect();
        let now: i64 = sqlx::query_scalar(&format!("SELECT {NOW}"))
            .fetch_one(&mut *tx)
            .await
            .map_err(map_err)?;
        // Each unit's delay: the longest retry among its failures, else none.
        let mut delays: std::collections::BTreeMap<Unit, i64> = Default::default();
        let mut units_of: std::collections::HashMap<i64, Unit> = Default::default();
        for chunk in all.chunks(1000) {
            let sql = format!(
                "SELECT seq, CONVERT(stream USING utf8mb4), CONVERT(okey USING utf8mb4) FROM {t}
                 WHERE seq IN ({}) AND strategy <> 'on_commit'",
                list(chunk.len())
            );
            let mut q = sqlx::query_as::<_, (i64, String, String)>(&sql);
            for seq in chunk {
                q = q.bind(seq);
            }
            for (seq, stream, key) in q.fetch_all(&mut *tx).await.map_err(map_err)? {
                let delay = failures
                    .iter()
                    .filter(|f| f.seq == seq)
                    .map(|f| match f.outcome {
                        Outcome::Retry { after } => after.as_millis() as i64,
                        _ => 0,
                    })
                    .max()
                    .unwrap_or(0);
                let d = delays.entry((stream.clone(), key.clone())).or_insert(0);
                *d = (*d).max(delay);
                units_of.insert(seq, (stream, key));
            }
        }
        // The units `owner` still holds (locked first: claims lock units, then rows), waiting
        // at most `lock_timeout` for a session that holds one.
        let mut held: std::collections::BTreeSet<Unit> = Default::default();
        if let Some(owner) = owner {
            let units: Vec<&Unit> = delays.keys().collect();
            for chunk in units.chunks(500) {
                let sql = self
                    .bounded(&format!(
                        "SELECT CONVERT(d.stream USING utf8mb4), CONVERT(d.okey USING utf8mb4) FROM {}
                         WHERE d.leased_by = ? FOR UPDATE",
                        units_join(t, chunk.len())
                    ))
                    .await?;
                let mut q = sqlx::query_as::<_, Unit>(&sql);
                for (stream, key) in chunk {
                    q = q.bind(stream).bind(key);
                }
                held.extend(q.bind(owner).fetch_all(&mut *tx).await.map_err(map_err)?);
            }
        }
        for chunk in done.chunks(1000) {
            let sql = if delete {
                format!("DELETE o FROM {}", seqs_join(t, chunk.len()))
            } else {
                format!(
                    "UPDATE {} SET o.status = 'sent', o.sent_at = ?, o.locked_by = NULL, o.locked_until = NULL",
                    seqs_join(t, chunk.len())
                )
            };
            let mut q = sqlx::query(&sql);
            for s in chunk {
                q = q.bind(s);
            }
            if !delete {
                q = q.bind(now);
            }
            q.execute(&mut *tx).await.map_err(map_err)?;
        }
        // A failure applies to a row `owner` holds: a publish-on-commit row leased to it, a
        // keep-order row of a unit it holds. One statement for the attempts (retries and dead
        // letters) and one for the releases, per 500 rows: per-row values by CASE on `seq`.
        let owner_name = owner.unwrap_or_default();
        let (attempted, released): (Vec<&Failure>, Vec<&Failure>) = failures
            .iter()
            .partition(|f| !matches!(f.outcome, Outcome::Release));
        let guard = |chunk: &[&Failure]| -> (String, Vec<i64>) {
            let mine: Vec<i64> = chunk
                .iter()
                .filter(|f| units_of.get(&f.seq).is_some_and(|u| held.contains(u)))
                .map(|f| f.seq)
                .collect();
            let sql = if mine.is_empty() {
                "locked_by = ?".to_owned()
            } else {
                format!("(locked_by = ? OR seq IN ({}))", list(mine.len()))
            };
            (sql, mine)
        };
        for chunk in attempted.chunks(500) {
            let (guard_sql, mine) = guard(chunk);
            let whens = vec!["WHEN ? THEN ?"; chunk.len()].join(" ");
            let dead: Vec<i64> = chunk
                .iter()
                .filter(|f| matches!(f.outcome, Outcome::Dead))
                .map(|f| f.seq)
                .collect();
            let retries: Vec<(i64, i64)> = chunk
                .iter()
                .filter_map(|f| match f.outcome {
                    Outcome::Retry { after } => Some((f.seq, now + after.as_millis() as i64)),
                    _ => None,
                })
                .collect();
            let next_at = if retries.is_empty() {
                "next_attempt_at".to_owned()
            } else {
                format!(
                    "CASE seq {} ELSE next_attempt_at END",
                    vec!["WHEN ? THEN ?"; retries.len()].join(" ")
                )
            };
            let status = if dead.is_empty() {
                "status".to_owned()
            } else {
                format!(
                    "CASE WHEN seq IN ({}) THEN 'dead' ELSE status END",
                    list(dead.len())
                )
            };
            let sql = format!(
                "UPDATE {t} SET attempts = attempts + 1,
                   last_error = CASE seq {whens} END,
                   next_attempt_at = {next_at},
                   status = {status}, locked_by = NULL, locked_until = NULL, claims = 0
                 WHERE seq IN ({}) AND status = 'pending' AND {guard_sql}",
                list(chunk.len())
            );
            let mut q = sqlx::query(&sql);
            for f in chunk {
                q = q.bind(f.seq).bind(&f.error);
            }
            for (seq, next) in &retries {
                q = q.bind(seq).bind(next);
            }
            for seq in &dead {
                q = q.bind(seq);
            }
            for f in chunk {
                q = q.bind(f.seq);
            }
            q = q.bind(owner_name);
            for seq in &mine {
                q = q.bind(seq);
            }
            q.execute(&mut *tx).await.map_err(map_err)?;
        }
        for chunk in released.chunks(500) {
            let (guard_sql, mine) = guard(chunk);
            let sql = format!(
                "UPDATE {t} SET locked_by = NULL, locked_until = NULL, claims = 0,
                   next_attempt_at = CASE WHEN strategy = 'on_commit' THEN ? ELSE next_attempt_at END
                 WHERE seq IN ({}) AND status = 'pending' AND {guard_sql}",
                list(chunk.len())
            );
            let mut q = sqlx::query(&sql).bind(now);
            for f in chunk {
                q = q.bind(f.seq);
            }
            q = q.bind(owner_name);
            for seq in &mine {
                q = q.bind(seq);
            }
            q.execute(&mut *tx).await.map_err(map_err)?;
        }
        // The units, one statement per retry delay (all free again but those whose head
        // failed).
        let mut by_delay: std::collections::BTreeMap<i64, Vec<&Unit>> = Default::default();
        for (unit, delay) in &delays {
            if owner.is_none() || held.contains(unit) {
                by_delay.entry(*delay).or_default().push(unit);
            }
        }
        for (delay, units) in by_delay {
            for chunk in units.chunks(500) {
                let sql = format!(
                    "UPDATE {} SET d.next_at = ?, d.leased_by = NULL, d.claims = 0 WHERE d.parked_at IS NULL",
                    units_join(t, chunk.len())
                );
                let mut q = sqlx::query(&sql);
                for (stream, key) in chunk {
                    q = q.bind(stream).bind(key);
                }
                q.bind(now + delay)
                    .execute(&mut *tx)
                    .await
                    .map_err(map_err)?;
            }
        }
        tx.commit().await.map_err(map_err)
    }

    /// Tables made before names were exact used `utf8mb4_bin`: convert their name columns and
    /// the lock table. Stored values keep their bytes (PAD SPACE affects comparisons, not
    /// storage), so rows whose names differed only by trailing spaces get their own streams
    /// and units back; no row moves and `seq` order is kept.
    pub(super) async fn convert_to_exact_names(&self, c: &str) -> outbox_core::Result<()> {
        let t = &self.inner.table;
        let stale: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.COLUMNS
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME IN (?, ?)
               AND COLUMN_NAME IN ('stream', 'msg_key', 'okey', 'locked_by')
               AND (COLLATION_NAME IS NULL OR COLLATION_NAME <> ?)",
        )
        .bind(t)
        .bind(format!("{t}_locks"))
        .bind(c)
        .fetch_one(&self.inner.pool)
        .await
        .map_err(map_err)?;
        if stale == 0 {
            return Ok(());
        }
        tracing::info!(table = %t, collation = c, "converting name columns to a byte-exact collation");
        for statement in [
            format!(
                "ALTER TABLE {t}
                    MODIFY stream VARCHAR(255) COLLATE {c} NOT NULL,
                    MODIFY msg_key VARCHAR(255) COLLATE {c} NULL,
                    MODIFY okey VARCHAR(255) COLLATE {c} NOT NULL,
                    MODIFY locked_by VARCHAR(64) COLLATE {c} NULL"
            ),
            format!("ALTER TABLE {t}_locks CONVERT TO CHARACTER SET utf8mb4 COLLATE {c}"),
        ] {
            sqlx::query(&statement)
                .execute(&self.inner.pool)
                .await
                .map_err(map_err)?;
        }
        Ok(())
    }
}
