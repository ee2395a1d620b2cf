//! A batch's outcome in one transaction: the units first (a unit whose head failed gets its
//! retry time, the others are free again; only while the relay still holds them, any holder
//! for `complete`), then the published rows, then the failures.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::*;

/// The keep-order rows of a settle: each row's unit, and each unit's delay (the longest retry
/// among its failures, else none).
#[derive(Default)]
struct Units {
    of_row: HashMap<i64, Unit>,
    delays: BTreeMap<Unit, i64>,
}

impl MySqlStore {
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
        let mut conn = self.inner.pool.acquire().await.map_err(map_err)?;
        // No gap locks: writers inserting a new unit's rows never wait on (or deadlock with)
        // a settle; every lock below is a row found by its primary key.
        sqlx::query("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            .execute(&mut *conn)
            .await
            .map_err(map_err)?;
        let mut tx = sqlx::Connection::begin(&mut *conn).await.map_err(map_err)?;
        let now: i64 = sqlx::query_scalar(&format!("SELECT {NOW}"))
            .fetch_one(&mut *tx)
            .await
            .map_err(map_err)?;
        let units = self.units_of(&mut tx, done, failures).await?;
        let held = match owner {
            Some(owner) => self.held(&mut tx, owner, &units).await?,
            None => BTreeSet::new(),
        };
        self.mark_done(&mut tx, done, delete, now).await?;
        // A failure applies to a row `owner` holds: a publish-on-commit row leased to it, a
        // keep-order row of a unit it holds.
        let guard = Guard {
            owner: owner.unwrap_or_default(),
            units: &units,
            held: &held,
        };
        let (attempted, released): (Vec<&Failure>, Vec<&Failure>) = failures
            .iter()
            .partition(|f| !matches!(f.outcome, Outcome::Release));
        for chunk in attempted.chunks(500) {
            self.attempted(&mut tx, chunk, now, &guard).await?;
        }
        for chunk in released.chunks(500) {
            self.released(&mut tx, chunk, now, &guard).await?;
        }
        self.free_units(&mut tx, owner.is_some(), &units, &held, now)
            .await?;
        tx.commit().await.map_err(map_err)
    }

    /// The units of the settled keep-order rows, and each unit's delay.
    async fn units_of(
        &self,
        tx: &mut MySqlConnection,
        done: &[i64],
        failures: &[Failure],
    ) -> outbox_core::Result<Units> {
        let all: Vec<i64> = done
            .iter()
            .copied()
            .chain(failures.iter().map(|f| f.seq))
            .collect();
        let mut units = Units::default();
        for chunk in all.chunks(1000) {
            let sql = format!(
                "SELECT seq, CONVERT(stream USING utf8mb4), CONVERT(okey USING utf8mb4) FROM {}
                 WHERE seq IN ({}) AND strategy <> 'on_commit'",
                self.inner.table,
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
                let d = units
                    .delays
                    .entry((stream.clone(), key.clone()))
                    .or_insert(0);
                *d = (*d).max(delay);
                units.of_row.insert(seq, (stream, key));
            }
        }
        Ok(units)
    }

    /// The units `owner` still holds (locked first: claims lock units, then rows), waiting at
    /// most `lock_timeout` for a session that holds one.
    async fn held(
        &self,
        tx: &mut MySqlConnection,
        owner: &str,
        units: &Units,
    ) -> outbox_core::Result<BTreeSet<Unit>> {
        let mut held = BTreeSet::new();
        let all: Vec<&Unit> = units.delays.keys().collect();
        for chunk in all.chunks(500) {
            let sql = self
                .bounded(&format!(
                    "SELECT CONVERT(d.stream USING utf8mb4), CONVERT(d.okey USING utf8mb4) FROM {}
                     WHERE d.leased_by = ? FOR UPDATE",
                    units_join(&self.inner.table, chunk.len())
                ))
                .await?;
            let mut q = sqlx::query_as::<_, Unit>(&sql);
            for (stream, key) in chunk {
                q = q.bind(stream).bind(key);
            }
            held.extend(q.bind(owner).fetch_all(&mut *tx).await.map_err(map_err)?);
        }
        Ok(held)
    }

    /// The published rows: marked sent, or deleted.
    async fn mark_done(
        &self,
        tx: &mut MySqlConnection,
        done: &[i64],
        delete: bool,
        now: i64,
    ) -> outbox_core::Result<()> {
        let t = &self.inner.table;
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
        Ok(())
    }

    /// Attempts (retries and dead letters) in one statement: per-row values by CASE on `seq`.
    async fn attempted(
        &self,
        tx: &mut MySqlConnection,
        chunk: &[&Failure],
        now: i64,
        guard: &Guard<'_>,
    ) -> outbox_core::Result<()> {
        let (guard_sql, mine) = guard.of(chunk);
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
            "UPDATE {} SET attempts = attempts + 1,
               last_error = CASE seq {whens} END,
               next_attempt_at = {next_at},
               status = {status}, locked_by = NULL, locked_until = NULL, claims = 0
             WHERE seq IN ({}) AND status = 'pending' AND {guard_sql}",
            self.inner.table,
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
        guard.run(q, &mine, tx).await
    }

    /// Releases (rows given back without an attempt) in one statement.
    async fn released(
        &self,
        tx: &mut MySqlConnection,
        chunk: &[&Failure],
        now: i64,
        guard: &Guard<'_>,
    ) -> outbox_core::Result<()> {
        let (guard_sql, mine) = guard.of(chunk);
        let sql = format!(
            "UPDATE {} SET locked_by = NULL, locked_until = NULL, claims = 0,
               next_attempt_at = CASE WHEN strategy = 'on_commit' THEN ? ELSE next_attempt_at END
             WHERE seq IN ({}) AND status = 'pending' AND {guard_sql}",
            self.inner.table,
            list(chunk.len())
        );
        let mut q = sqlx::query(&sql).bind(now);
        for f in chunk {
            q = q.bind(f.seq);
        }
        guard.run(q, &mine, tx).await
    }

    /// The units, one statement per retry delay: all free again but those whose head failed
    /// (only those `owner` holds, when there is an owner).
    async fn free_units(
        &self,
        tx: &mut MySqlConnection,
        owned: bool,
        units: &Units,
        held: &BTreeSet<Unit>,
        now: i64,
    ) -> outbox_core::Result<()> {
        let mut by_delay: BTreeMap<i64, Vec<&Unit>> = Default::default();
        for (unit, delay) in &units.delays {
            if !owned || held.contains(unit) {
                by_delay.entry(*delay).or_default().push(unit);
            }
        }
        for (delay, units) in by_delay {
            for chunk in units.chunks(500) {
                let sql = format!(
                    "UPDATE {} SET d.next_at = ?, d.leased_by = NULL, d.claims = 0 WHERE d.parked_at IS NULL",
                    units_join(&self.inner.table, chunk.len())
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
        Ok(())
    }
}

/// Which failed rows a settle may touch: those leased to `owner` (publish-on-commit) or in a
/// unit it holds (keep-order).
struct Guard<'a> {
    owner: &'a str,
    units: &'a Units,
    held: &'a BTreeSet<Unit>,
}

impl Guard<'_> {
    /// Binds the guard's values (after the statement's own) and runs the statement.
    async fn run<'q>(
        &'q self,
        q: sqlx::query::Query<'q, MySql, sqlx::mysql::MySqlArguments>,
        mine: &'q [i64],
        tx: &mut MySqlConnection,
    ) -> outbox_core::Result<()> {
        let mut q = q.bind(self.owner);
        for seq in mine {
            q = q.bind(seq);
        }
        q.execute(tx).await.map_err(map_err)?;
        Ok(())
    }

    /// The guard's SQL for a chunk, and the keep-order rows it lets through by `seq`.
    fn of(&self, chunk: &[&Failure]) -> (String, Vec<i64>) {
        let mine: Vec<i64> = chunk
            .iter()
            .filter(|f| {
                self.units
                    .of_row
                    .get(&f.seq)
                    .is_some_and(|u| self.held.contains(u))
            })
            .map(|f| f.seq)
            .collect();
        let sql = if mine.is_empty() {
            "locked_by = ?".to_owned()
        } else {
            format!("(locked_by = ? OR seq IN ({}))", list(mine.len()))
        };
        (sql, mine)
    }
}
