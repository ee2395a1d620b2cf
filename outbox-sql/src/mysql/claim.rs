//! A claim, in one transaction: lock due units (SKIP LOCKED: a unit is claimed by one relay at
//! a time), read each unit's first rows through `<table>_unit` (a blocked unit's rows are
//! never read) and the due publish-on-commit rows through `<table>_oc`, take them unit by unit
//! ([`Claim::sort_unit_by_unit`]) within the limit and the byte budget, lease them and their
//! units.

use super::*;

/// The stream filter of a claim's statements: its SQL and its values.
struct Streams<'c> {
    sql: String,
    values: &'c [String],
}

impl<'c> Streams<'c> {
    fn new(filter: &'c StreamFilter) -> Self {
        match filter {
            StreamFilter::All => Self {
                sql: String::new(),
                values: &[],
            },
            StreamFilter::Only(s) => Self {
                sql: format!(" AND stream IN ({})", list(s.len())),
                values: s,
            },
        }
    }
}

/// The units a claim locked, with each one's claims without an outcome so far (this claim
/// adds one when it takes rows).
struct DueUnits {
    units: Vec<Unit>,
    claims: Vec<i64>,
}

impl MySqlStore {
    /// One claim transaction. Returns the rows and the units that had no pending row.
    pub(super) async fn claim_once(
        &self,
        claim: &Claim,
    ) -> outbox_core::Result<(Vec<outbox_core::Claimed>, Vec<Unit>)> {
        let mut conn = self.inner.pool.acquire().await.map_err(map_err)?;
        // Each statement sees the latest committed rows.
        sqlx::query("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            .execute(&mut *conn)
            .await
            .map_err(map_err)?;
        let lease_rows = self
            .bounded(&format!(
                "UPDATE {} SET locked_by = ?, locked_until = ?, next_attempt_at = ?, claims = claims + 1 WHERE seq IN ",
                self.inner.table
            ))
            .await?;
        let mut tx = sqlx::Connection::begin(&mut *conn).await.map_err(map_err)?;
        let streams = Streams::new(&claim.streams);
        let now: i64 = sqlx::query_scalar(&format!("SELECT {NOW}"))
            .fetch_one(&mut *tx)
            .await
            .map_err(map_err)?;
        let due = self.due_units(&mut tx, claim, now, &streams).await?;
        let (mut candidates, seen) = self.unit_rows(&mut tx, claim, now, &due.units).await?;
        let mut blocked = first_blocked(&mut candidates, due.units.len());
        candidates.extend(self.on_commit_rows(&mut tx, claim, now, &streams).await?);
        Claim::sort_unit_by_unit(&mut candidates, |c| (c.seq, c.unit));
        candidates.truncate(claim.limit);
        let sizes: Vec<usize> = candidates.iter().map(|c| c.size).collect();
        let fits = claim.within_budget(&sizes);
        let taken: Vec<&Candidate> = candidates
            .iter()
            .zip(fits)
            .take_while(|(_, fits)| *fits)
            .map(|(c, _)| c)
            .collect();
        let mut rows = Vec::new();
        if !taken.is_empty() {
            rows = self.load(&mut tx, claim, &taken, &due.claims).await?;
            let until = now + claim.lease.as_millis() as i64;
            let on_commit: Vec<i64> = taken
                .iter()
                .filter(|c| c.unit.is_none())
                .map(|c| c.seq)
                .collect();
            lease_on_commit(&mut tx, &lease_rows, claim, until, &on_commit).await?;
            for u in self
                .lease_units(&mut tx, claim, until, &taken, &due.units)
                .await?
            {
                blocked[u] = None;
            }
        }
        self.back_off(&mut tx, &due.units, &blocked).await?;
        tx.commit().await.map_err(map_err)?;
        let empty = due
            .units
            .into_iter()
            .zip(seen)
            .filter(|(_, seen)| !seen)
            .map(|(u, _)| u)
            .collect();
        Ok((rows, empty))
    }

    /// Due units, locked with SKIP LOCKED, earliest first.
    async fn due_units(
        &self,
        tx: &mut MySqlConnection,
        claim: &Claim,
        now: i64,
        streams: &Streams<'_>,
    ) -> outbox_core::Result<DueUnits> {
        let due = format!(
            "SELECT CONVERT(stream USING utf8mb4), CONVERT(okey USING utf8mb4), claims FROM {}_due
             WHERE next_at <= ?{} ORDER BY next_at LIMIT ? FOR UPDATE SKIP LOCKED",
            self.inner.table, streams.sql
        );
        let mut q = sqlx::query_as::<_, (String, String, i64)>(&due).bind(now);
        for s in streams.values {
            q = q.bind(s);
        }
        let (units, claims) = q
            .bind(claim.limit as i64)
            .fetch_all(tx)
            .await
            .map_err(map_err)?
            .into_iter()
            .map(|(s, k, n)| ((s, k), n))
            .unzip();
        Ok(DueUnits { units, claims })
    }

    /// Each unit's first pending rows ([`Claim::rows_per_unit`] each) through `<table>_unit`, with
    /// their sizes and whether they are blocked; and which units had any.
    async fn unit_rows(
        &self,
        tx: &mut MySqlConnection,
        claim: &Claim,
        now: i64,
        units: &[Unit],
    ) -> outbox_core::Result<(Vec<Candidate>, Vec<bool>)> {
        let mut candidates = Vec::new();
        let mut seen = vec![false; units.len()];
        if units.is_empty() {
            return Ok((candidates, seen));
        }
        let per = claim.rows_per_unit(units.len()) as i64;
        let one = format!(
            "(SELECT seq, CONVERT(stream USING utf8mb4), CONVERT(okey USING utf8mb4),
               CAST(LENGTH(payload) + LENGTH(headers) AS SIGNED),
               CASE WHEN locked_until > ? THEN 0 WHEN next_attempt_at > ? THEN next_attempt_at END
             FROM {} WHERE status = 'pending' AND stream = ? AND okey = ? AND strategy <> 'on_commit'
             ORDER BY seq LIMIT ?)",
            self.inner.table
        );
        let sql = vec![one.as_str(); units.len()].join(" UNION ALL ");
        let mut q = sqlx::query_as::<_, (i64, String, String, i64, Option<i64>)>(&sql);
        for (stream, key) in units {
            q = q.bind(now).bind(now).bind(stream).bind(key).bind(per);
        }
        let index: std::collections::HashMap<&Unit, usize> =
            units.iter().enumerate().map(|(i, u)| (u, i)).collect();
        for (seq, stream, key, size, blocked) in q.fetch_all(tx).await.map_err(map_err)? {
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
        Ok((candidates, seen))
    }

    /// Due publish-on-commit rows, locked with SKIP LOCKED.
    async fn on_commit_rows(
        &self,
        tx: &mut MySqlConnection,
        claim: &Claim,
        now: i64,
        streams: &Streams<'_>,
    ) -> outbox_core::Result<Vec<Candidate>> {
        let on_commit = format!(
            "SELECT seq, CAST(LENGTH(payload) + LENGTH(headers) AS SIGNED) FROM {}
             WHERE strategy = 'on_commit' AND status = 'pending' AND next_attempt_at <= ?
               AND (locked_until IS NULL OR locked_until <= ?){}
             ORDER BY next_attempt_at LIMIT ? FOR UPDATE SKIP LOCKED",
            self.inner.table, streams.sql
        );
        let mut q = sqlx::query_as::<_, (i64, i64)>(&on_commit)
            .bind(now)
            .bind(now);
        for s in streams.values {
            q = q.bind(s);
        }
        let rows = q
            .bind(claim.limit as i64)
            .fetch_all(tx)
            .await
            .map_err(map_err)?;
        Ok(rows
            .into_iter()
            .map(|(seq, size)| Candidate {
                seq,
                unit: None,
                size: size.max(0) as usize,
                blocked: None,
            })
            .collect())
    }

    /// The taken rows, whole (an oversized payload is read as NULL), keep-order rows with
    /// their unit's claims.
    async fn load(
        &self,
        tx: &mut MySqlConnection,
        claim: &Claim,
        taken: &[&Candidate],
        unit_claims: &[i64],
    ) -> outbox_core::Result<Vec<outbox_core::Claimed>> {
        let load = format!(
            "SELECT {cols}, CAST(LENGTH(payload) + LENGTH(headers) AS SIGNED), claims + 1 FROM {}
             WHERE seq IN ({}) ORDER BY seq",
            self.inner.table,
            list(taken.len()),
            cols = cols("CASE WHEN LENGTH(payload) > ? THEN NULL ELSE payload END")
        );
        let mut q = sqlx::query(&load).bind(claim.max_row_bytes as i64);
        for c in taken {
            q = q.bind(c.seq);
        }
        let mut rows = Vec::with_capacity(taken.len());
        for row in q.fetch_all(tx).await.map_err(map_err)? {
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
        Ok(rows)
    }

    /// The units rows were taken from are leased with them (keep-order rows are leased
    /// through their unit: no row is rewritten). Returns the units leased.
    async fn lease_units(
        &self,
        tx: &mut MySqlConnection,
        claim: &Claim,
        until: i64,
        taken: &[&Candidate],
        units: &[Unit],
    ) -> outbox_core::Result<Vec<usize>> {
        let mut leased: Vec<usize> = taken.iter().filter_map(|c| c.unit).collect();
        leased.sort_unstable();
        leased.dedup();
        if leased.is_empty() {
            return Ok(leased);
        }
        let sql = format!(
            "UPDATE {} SET d.next_at = ?, d.leased_by = ?, d.claims = d.claims + 1",
            units_join(&self.inner.table, leased.len())
        );
        let mut q = sqlx::query(&sql);
        for &u in &leased {
            q = q.bind(&units[u].0).bind(&units[u].1);
        }
        q.bind(until)
            .bind(&claim.owner)
            .execute(tx)
            .await
            .map_err(map_err)?;
        Ok(leased)
    }

    /// A unit whose head backs off is due at the head's retry time.
    async fn back_off(
        &self,
        tx: &mut MySqlConnection,
        units: &[Unit],
        blocked: &[Option<i64>],
    ) -> outbox_core::Result<()> {
        let sql = format!(
            "UPDATE {}_due SET next_at = ? WHERE stream = ? AND okey = ?",
            self.inner.table
        );
        for (u, until) in blocked.iter().enumerate() {
            if let Some(until) = until.filter(|&until| until > 0) {
                sqlx::query(&sql)
                    .bind(until)
                    .bind(&units[u].0)
                    .bind(&units[u].1)
                    .execute(&mut *tx)
                    .await
                    .map_err(map_err)?;
            }
        }
        Ok(())
    }
}

/// A unit yields its rows before its first blocked one: drops the rest, and returns per unit
/// when its first blocked row may go (0: leased).
fn first_blocked(candidates: &mut Vec<Candidate>, units: usize) -> Vec<Option<i64>> {
    candidates.sort_by_key(|c| c.seq);
    let mut stopped = vec![None::<i64>; units];
    candidates.retain(|c| match (c.unit, c.blocked) {
        (Some(u), _) if stopped[u].is_some() => false,
        (Some(u), Some(until)) => {
            stopped[u] = Some(until);
            false
        }
        _ => true,
    });
    stopped
}

/// Publish-on-commit rows carry their own lease (locked with SKIP LOCKED by the claim).
async fn lease_on_commit(
    tx: &mut MySqlConnection,
    lease_rows: &str,
    claim: &Claim,
    until: i64,
    seqs: &[i64],
) -> outbox_core::Result<()> {
    if seqs.is_empty() {
        return Ok(());
    }
    let update = format!("{lease_rows}({})", list(seqs.len()));
    let mut q = sqlx::query(&update)
        .bind(&claim.owner)
        .bind(until)
        .bind(until);
    for seq in seqs {
        q = q.bind(seq);
    }
    q.execute(tx).await.map_err(map_err)?;
    Ok(())
}
