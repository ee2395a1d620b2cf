//! A batch's outcome in one transaction. Failures apply to rows `owner` still holds: a
//! publish-on-commit row leased to it, a keep-order row whose unit it leases. Then the units
//! are settled (a unit whose head failed is due at its retry time, the others now), only
//! while `owner` holds them (any holder for `complete`).

use rusqlite::types::Value;

use super::*;

pub(crate) fn settle_rows(
    conn: &mut Connection,
    sql: &Sql,
    owner: Option<&str>,
    done: &[i64],
    delete: bool,
    failures: &[Failure],
) -> outbox_core::Result<()> {
    let t = &sql.table;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(map_err)?;
    let now = to_millis(SystemTime::now());
    let delays = unit_delays(&tx, t, done, failures)?;
    record_failures(&tx, t, owner.unwrap_or_default(), failures, now)?;
    for chunk in done.chunks(500) {
        let text = sql::complete(t, delete, chunk.len());
        let mut statement = tx.prepare_cached(&text).map_err(map_err)?;
        let r = if delete {
            statement.execute(params_from_iter(chunk))
        } else {
            statement.execute(params_from_iter(
                std::iter::once(now).chain(chunk.iter().copied()),
            ))
        };
        r.map_err(map_err)?;
    }
    let mut unit = tx
        .prepare_cached(&format!(
            "UPDATE {t}_due SET next_at = ?1, leased_by = NULL, claims = 0
             WHERE stream = ?2 AND okey = ?3 AND (?4 IS NULL OR leased_by = ?4) AND parked_at IS NULL"
        ))
        .map_err(map_err)?;
    for (s, k, delay) in &delays {
        unit.execute(params![now + delay, s, k, owner])
            .map_err(map_err)?;
    }
    drop(unit);
    tx.commit().map_err(map_err)
}

/// Each keep-order unit touched, with the longest retry delay among its failures.
fn unit_delays(
    tx: &Connection,
    t: &str,
    done: &[i64],
    failures: &[Failure],
) -> outbox_core::Result<Vec<(Value, Value, i64)>> {
    let delay_of = |seq: i64| {
        failures
            .iter()
            .filter(|f| f.seq == seq)
            .map(|f| match f.outcome {
                Outcome::Retry { after } => after.as_millis() as i64,
                _ => 0,
            })
            .max()
            .unwrap_or(0)
    };
    let all: Vec<i64> = done
        .iter()
        .copied()
        .chain(failures.iter().map(|f| f.seq))
        .collect();
    let mut delays: Vec<(Value, Value, i64)> = Vec::new();
    for chunk in all.chunks(500) {
        let mut stmt = tx
            .prepare_cached(&format!(
                "SELECT seq, stream, okey FROM {t} WHERE seq IN ({}) AND strategy <> 'on_commit'",
                placeholders(chunk.len(), 1)
            ))
            .map_err(map_err)?;
        let rows: Vec<(i64, Value, Value)> = stmt
            .query_map(params_from_iter(chunk), |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .and_then(|rows| rows.collect())
            .map_err(map_err)?;
        for (seq, s, k) in rows {
            let delay = delay_of(seq);
            match delays.iter_mut().find(|(us, uk, _)| *us == s && *uk == k) {
                Some(entry) => entry.2 = entry.2.max(delay),
                None => delays.push((s, k, delay)),
            }
        }
    }
    Ok(delays)
}

/// Retries, dead letters and releases, each on a row `owner` holds.
fn record_failures(
    tx: &Connection,
    t: &str,
    owner: &str,
    failures: &[Failure],
    now: i64,
) -> outbox_core::Result<()> {
    let holds = format!(
        "(locked_by = ?4 OR (strategy <> 'on_commit' AND EXISTS (
           SELECT 1 FROM {t}_due d WHERE d.stream = {t}.stream AND d.okey = {t}.okey AND d.leased_by = ?4)))"
    );
    let mut retry = tx
        .prepare_cached(&format!(
            "UPDATE {t} SET attempts = attempts + 1, last_error = ?1, next_attempt_at = ?2, locked_by = NULL,
               locked_until = NULL, claims = 0 WHERE seq = ?3 AND status = 'pending' AND {holds}"
        ))
        .map_err(map_err)?;
    let mut dead = tx
        .prepare_cached(&format!(
            "UPDATE {t} SET attempts = attempts + 1, last_error = ?1, status = 'dead', locked_by = NULL,
               locked_until = NULL, claims = 0 WHERE seq = ?3 AND status = 'pending' AND {holds}"
        ))
        .map_err(map_err)?;
    let mut release = tx
        .prepare_cached(&format!(
            "UPDATE {t} SET locked_by = NULL, locked_until = NULL, claims = 0,
               next_attempt_at = CASE WHEN strategy = 'on_commit' THEN ?2 ELSE next_attempt_at END
             WHERE seq = ?3 AND status = 'pending' AND {holds}"
        ))
        .map_err(map_err)?;
    for f in failures {
        // ?1 error, ?2 time, ?3 seq, ?4 owner (each statement uses what it needs).
        let r = match &f.outcome {
            Outcome::Retry { after } => retry.execute(params![
                f.error,
                now + after.as_millis() as i64,
                f.seq,
                owner
            ]),
            Outcome::Dead => dead.execute(params![f.error, now, f.seq, owner]),
            Outcome::Release => release.execute(params![f.error, now, f.seq, owner]),
        };
        r.map_err(map_err)?;
    }
    Ok(())
}
