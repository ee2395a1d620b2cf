//! One claim under `BEGIN IMMEDIATE` (the write lock first, so two relays never read the same
//! rows): due keep-order units through `<table>_due_next`, each unit's first rows through
//! `<table>_unit` (a blocked unit's rows are never read), due publish-on-commit rows through
//! `<table>_oc`; rows taken unit by unit ([`Claim::sort_unit_by_unit`]) within the limit and
//! the byte budget. Keep-order
//! rows are leased through their unit (no row is rewritten, payload included);
//! publish-on-commit rows carry their own lease. Units with no pending row are forgotten.

use std::collections::HashMap;

use rusqlite::types::Value;

use super::*;

/// The stream filter of a claim's statements (values from `?3`).
struct Streams {
    sql: String,
    values: Vec<Value>,
}

impl Streams {
    fn new(filter: &StreamFilter) -> Self {
        match filter {
            StreamFilter::All => Self {
                sql: String::new(),
                values: Vec::new(),
            },
            StreamFilter::Only(s) => Self {
                sql: format!(" AND stream IN ({})", placeholders(s.len(), 3)),
                values: s.iter().map(|s| Value::Text(s.clone())).collect(),
            },
        }
    }

    /// `?1` now, `?2` the limit, then the streams.
    fn args(&self, now: i64, limit: usize) -> impl Iterator<Item = Value> + '_ {
        [Value::Integer(now), Value::Integer(limit as i64)]
            .into_iter()
            .chain(self.values.iter().cloned())
    }
}

/// A row a claim considers: `seq`, its unit (keep-order only), its size.
type Candidate = (i64, Option<usize>, usize);

/// What the units' first rows showed.
struct UnitRows {
    candidates: Vec<Candidate>,
    /// Per unit, when its first blocked row may go (0: leased).
    blocked: Vec<Option<i64>>,
    /// Units with no pending row.
    empty: Vec<usize>,
}

pub(crate) fn claim_rows(
    conn: &mut Connection,
    sql: &Sql,
    claim: &Claim,
    adopt: bool,
) -> outbox_core::Result<Vec<Claimed>> {
    let t = &sql.table;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(map_err)?;
    if adopt {
        tx.execute(&sql.adopt, []).map_err(map_err)?;
    }
    let now = to_millis(SystemTime::now());
    let streams = Streams::new(&claim.streams);
    let units = due_units(&tx, t, claim, now, &streams)?;
    let mut found = unit_rows(&tx, t, claim, now, &units)?;
    let mut candidates = found.candidates;
    candidates.extend(on_commit_rows(&tx, t, claim, now, &streams)?);
    Claim::sort_unit_by_unit(&mut candidates, |c| (c.0, c.1));
    candidates.truncate(claim.limit);
    let sizes: Vec<usize> = candidates.iter().map(|c| c.2).collect();
    let fits = claim.within_budget(&sizes);
    let taken: Vec<(i64, Option<usize>)> = candidates
        .iter()
        .zip(fits)
        .take_while(|(_, fits)| *fits)
        .map(|(c, _)| (c.0, c.1))
        .collect();
    let mut out = load(&tx, t, claim, &taken)?;
    let until = now + claim.lease.as_millis() as i64;
    let claims = lease(&tx, t, claim, until, &taken, &units, &mut found.blocked)?;
    for m in out.iter_mut().flatten() {
        m.claims = claims.get(&m.seq).copied().unwrap_or(0);
    }
    back_off_and_forget(&tx, t, &units, &found.blocked, &found.empty)?;
    tx.commit().map_err(map_err)?;
    out.sort_by_key(|r| match r {
        Ok(m) => m.seq,
        Err(q) => q.seq,
    });
    Ok(out)
}

/// Due units, earliest first.
fn due_units(
    tx: &Connection,
    t: &str,
    claim: &Claim,
    now: i64,
    streams: &Streams,
) -> outbox_core::Result<Vec<(Value, Value)>> {
    let mut stmt = tx
        .prepare_cached(&format!(
            "SELECT stream, okey FROM {t}_due WHERE next_at <= ?1{} ORDER BY next_at LIMIT ?2",
            streams.sql
        ))
        .map_err(map_err)?;
    stmt.query_map(params_from_iter(streams.args(now, claim.limit)), |r| {
        Ok((r.get(0)?, r.get(1)?))
    })
    .and_then(|rows| rows.collect())
    .map_err(map_err)
}

/// Each unit's first pending rows ([`Claim::rows_per_unit`] each), up to its first blocked one.
fn unit_rows(
    tx: &Connection,
    t: &str,
    claim: &Claim,
    now: i64,
    units: &[(Value, Value)],
) -> outbox_core::Result<UnitRows> {
    let mut found = UnitRows {
        candidates: Vec::new(),
        blocked: vec![None; units.len()],
        empty: Vec::new(),
    };
    if units.is_empty() {
        return Ok(found);
    }
    let per = claim.rows_per_unit(units.len()) as i64;
    let mut stmt = tx
        .prepare_cached(&format!(
            "SELECT seq, octet_length(payload) + octet_length(headers),
               CASE WHEN locked_until > ?1 THEN 0 WHEN next_attempt_at > ?1 THEN next_attempt_at END
             FROM {t} WHERE status = 'pending' AND stream = ?2 AND okey = ?3 AND strategy <> 'on_commit'
             ORDER BY seq LIMIT ?4"
        ))
        .map_err(map_err)?;
    for (u, (stream, key)) in units.iter().enumerate() {
        let rows: Vec<(i64, i64, Option<i64>)> = stmt
            .query_map(params![now, stream, key, per], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .and_then(|rows| rows.collect())
            .map_err(map_err)?;
        if rows.is_empty() {
            found.empty.push(u);
        }
        for (seq, size, until) in rows {
            if let Some(until) = until {
                found.blocked[u] = Some(until);
                break;
            }
            found.candidates.push((seq, Some(u), size.max(0) as usize));
        }
    }
    Ok(found)
}

/// Due publish-on-commit rows.
fn on_commit_rows(
    tx: &Connection,
    t: &str,
    claim: &Claim,
    now: i64,
    streams: &Streams,
) -> outbox_core::Result<Vec<Candidate>> {
    let mut stmt = tx
        .prepare_cached(&format!(
            "SELECT seq, octet_length(payload) + octet_length(headers) FROM {t}
             WHERE status = 'pending' AND strategy = 'on_commit' AND next_attempt_at <= ?1
               AND (locked_until IS NULL OR locked_until <= ?1){}
             ORDER BY next_attempt_at LIMIT ?2",
            streams.sql
        ))
        .map_err(map_err)?;
    let rows: Vec<(i64, i64)> = stmt
        .query_map(params_from_iter(streams.args(now, claim.limit)), |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .and_then(|rows| rows.collect())
        .map_err(map_err)?;
    Ok(rows
        .into_iter()
        .map(|(seq, size)| (seq, None, size.max(0) as usize))
        .collect())
}

/// The taken rows, whole (an oversized payload is read as NULL).
fn load(
    tx: &Connection,
    t: &str,
    claim: &Claim,
    taken: &[(i64, Option<usize>)],
) -> outbox_core::Result<Vec<Claimed>> {
    let mut out = Vec::with_capacity(taken.len());
    for chunk in taken.chunks(500) {
        let load = format!(
            "SELECT {cols}, octet_length(payload) + octet_length(headers) FROM {t} WHERE seq IN ({})",
            placeholders(chunk.len(), 2),
            cols = cols("CASE WHEN octet_length(payload) > ?1 THEN NULL ELSE payload END")
        );
        let args = std::iter::once(claim.max_row_bytes.min(i64::MAX as usize) as i64)
            .chain(chunk.iter().map(|c| c.0));
        let mut stmt = tx.prepare(&load).map_err(map_err)?;
        let rows = stmt
            .query_map(params_from_iter(args), |row| claimed_row(row, claim))
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(map_err)?;
        out.extend(rows);
    }
    Ok(out)
}

/// Leases the taken rows: publish-on-commit rows their own, keep-order rows through their
/// unit (whose block is lifted). Leases count the claims (reset when an outcome is
/// recorded): a row or unit claimed again without one is a suspect of a crash loop (see
/// the relay). Returns each taken row's claims.
fn lease(
    tx: &Connection,
    t: &str,
    claim: &Claim,
    until: i64,
    taken: &[(i64, Option<usize>)],
    units: &[(Value, Value)],
    blocked: &mut [Option<i64>],
) -> outbox_core::Result<HashMap<i64, u32>> {
    let mut claims: HashMap<i64, u32> = HashMap::new();
    let mut lease = tx
        .prepare_cached(&format!(
            "UPDATE {t} SET locked_by = ?1, locked_until = ?2, next_attempt_at = ?2, claims = claims + 1
             WHERE seq = ?3 RETURNING claims"
        ))
        .map_err(map_err)?;
    for (seq, _) in taken.iter().filter(|c| c.1.is_none()) {
        let n: i64 = lease
            .query_row(params![claim.owner, until, seq], |r| r.get(0))
            .map_err(map_err)?;
        claims.insert(*seq, n.clamp(0, u32::MAX as i64) as u32);
    }
    let mut lease_unit = tx
        .prepare_cached(&format!(
            "UPDATE {t}_due SET next_at = ?1, leased_by = ?2, claims = claims + 1
             WHERE stream = ?3 AND okey = ?4 RETURNING claims"
        ))
        .map_err(map_err)?;
    let mut leased: Vec<usize> = taken.iter().filter_map(|c| c.1).collect();
    leased.sort_unstable();
    leased.dedup();
    let mut unit_claims = vec![0u32; units.len()];
    for &u in &leased {
        let n: i64 = lease_unit
            .query_row(params![until, claim.owner, units[u].0, units[u].1], |r| {
                r.get(0)
            })
            .map_err(map_err)?;
        unit_claims[u] = n.clamp(0, u32::MAX as i64) as u32;
        blocked[u] = None;
    }
    for (seq, u) in taken {
        if let Some(u) = u {
            claims.insert(*seq, unit_claims[*u]);
        }
    }
    Ok(claims)
}

/// A head backing off makes its unit due at its retry time; units with no pending row are
/// forgotten.
fn back_off_and_forget(
    tx: &Connection,
    t: &str,
    units: &[(Value, Value)],
    blocked: &[Option<i64>],
    empty: &[usize],
) -> outbox_core::Result<()> {
    let mut unit = tx
        .prepare_cached(&format!(
            "UPDATE {t}_due SET next_at = ?1, leased_by = ?2 WHERE stream = ?3 AND okey = ?4"
        ))
        .map_err(map_err)?;
    for (u, b) in blocked.iter().enumerate() {
        if let Some(at) = b.filter(|&at| at > 0) {
            unit.execute(params![at, Value::Null, units[u].0, units[u].1])
                .map_err(map_err)?;
        }
    }
    let mut forget = tx
        .prepare_cached(&format!(
            "DELETE FROM {t}_due WHERE stream = ?1 AND okey = ?2"
        ))
        .map_err(map_err)?;
    for &u in empty {
        forget
            .execute(params![units[u].0, units[u].1])
            .map_err(map_err)?;
    }
    Ok(())
}
