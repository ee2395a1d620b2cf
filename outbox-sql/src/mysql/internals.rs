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
        let t = &self.inner.table;
        let mut out = vec![versions(t)];
        out.extend(create_tables(t, c));
        out.extend(
            outbox_core::SCHEMA_STEPS
                .iter()
                .map(|s| record_version(t, s)),
        );
        Ok(out)
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

    /// Schema step 1: the tables, indexes and columns of 0.1, made or brought up to date from
    /// any shape an earlier build made (columns added, collations converted, indexes of
    /// older claims dropped), losing no row. Idempotent.
    pub(super) async fn step_one(&self) -> outbox_core::Result<()> {
        let t = &self.inner.table;
        let c = self.exact_collation().await?;
        let [outbox, locks, due] = create_tables(t, c);
        let statements = [outbox, locks];
        for s in statements {
            sqlx::query(&s)
                .execute(&self.inner.pool)
                .await
                .map_err(map_err)?;
        }
        self.convert_to_exact_names(c).await?;
        sqlx::query(&due)
            .execute(&self.inner.pool)
            .await
            .map_err(map_err)?;
        // Columns added after a table's first version.
        self.add_column(
            t,
            "on_exhausted",
            "ADD COLUMN on_exhausted VARCHAR(16) NULL",
        )
        .await?;
        self.add_column(t, "claims", "ADD COLUMN claims INT NOT NULL DEFAULT 0")
            .await?;
        // Writers tell a new or forgotten unit from a known one by these (see `lock_units`);
        // every lock row of an older table has its row of `<table>_due`.
        for (column, ddl) in [
            ("writes", "ADD COLUMN writes BIGINT NOT NULL DEFAULT 0"),
            ("due", "ADD COLUMN due TINYINT NOT NULL DEFAULT 1"),
        ] {
            self.add_column(&format!("{t}_locks"), column, ddl).await?;
        }
        self.add_column(
            &format!("{t}_due"),
            "claims",
            "ADD COLUMN claims INT NOT NULL DEFAULT 0",
        )
        .await?;
        self.add_column(
            &format!("{t}_due"),
            "parked_at",
            "ADD COLUMN parked_at BIGINT NULL, ADD COLUMN parked_reason TEXT NULL, ADD KEY due_parked (parked_at)",
        )
        .await?;
        // Tables made before claims went by unit: their indexes and the claim lock table go,
        // publish-on-commit rows get an index of their own, leased ones are due at the
        // lease's end, and every unit with pending rows gets its rows of the unit tables.
        for index in ["leased", "backoff"] {
            if self.index_exists(&format!("{t}_{index}")).await? {
                sqlx::query(&format!("ALTER TABLE {t} DROP INDEX {t}_{index}"))
                    .execute(&self.inner.pool)
                    .await
                    .map_err(map_err)?;
            }
        }
        for (index, columns) in [
            ("oc", "strategy, status, next_attempt_at"),
            // Dead letters are listed (and bulk-requeued) oldest first in pages: through this
            // index a page reads its own rows, not every dead row.
            ("dead", "status, created_at"),
        ] {
            if !self.index_exists(&format!("{t}_{index}")).await? {
                sqlx::query(&format!(
                    "ALTER TABLE {t} ADD INDEX {t}_{index} ({columns})"
                ))
                .execute(&self.inner.pool)
                .await
                .map_err(map_err)?;
            }
        }
        for statement in [
            format!("DROP TABLE IF EXISTS {t}_claim"),
            format!(
                "UPDATE {t} SET next_attempt_at = locked_until
                 WHERE strategy = 'on_commit' AND status = 'pending' AND locked_until > next_attempt_at"
            ),
        ] {
            sqlx::query(&statement)
                .execute(&self.inner.pool)
                .await
                .map_err(map_err)?;
        }
        self.adopt_orphans(true).await?;
        Ok(())
    }
}
