//! `outbox stats`: counts per stream.

use super::*;

/// `outbox stats`: counts per stream.
/// With `slot` (`--wal`), also the WAL relay's slot: the WAL it keeps and whether a relay
/// reads it.
pub(super) async fn stats(
    store: &AnyStore,
    table: &str,
    slot: Option<&str>,
    json: bool,
) -> Result<u8, Error> {
    store.require_table().await?;
    let wal = match (slot, store) {
        (None, _) => None,
        (Some(slot), AnyStore::Postgres(pg)) => Some((
            slot,
            outbox_sql::postgres::wal::slot_lag(pg.pool(), slot)
                .await?
                .ok_or_else(|| {
                    Error::config(format!(
                        "slot {slot} does not exist: run `outbox migrate --wal`"
                    ))
                })?,
        )),
        (Some(_), _) => {
            return Err(Error::config(
                "--wal: the WAL relay is PostgreSQL's; the store must be postgres://…",
            ))
        }
    };
    let stats = store.store().stats().await?;
    let now = SystemTime::now();
    let age =
        |s: &outbox_core::StreamStats| s.oldest_pending.and_then(|t| now.duration_since(t).ok());
    if json {
        let mut out = json::stats(table, &stats, now);
        if let Some((slot, lag)) = wal {
            out["wal"] = json::wal(slot, Some(&lag));
        }
        println!("{out}");
        return Ok(exit::OK);
    }
    println!(
        "{:<24} {:>10} {:>10} {:>10}  oldest pending",
        "stream", "pending", "sent", "dead"
    );
    let mut rows = stats.streams.clone();
    rows.push(stats.total());
    for s in rows {
        let age = age(&s)
            .map(|d| humantime::format_duration(Duration::from_secs(d.as_secs())).to_string())
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<24} {:>10} {:>10} {:>10}  {age}",
            printable(&s.stream),
            s.pending,
            s.sent,
            s.dead
        );
    }
    if let Some((slot, lag)) = wal {
        println!("{}", crate::output::wal_line(slot, &lag));
    }
    Ok(exit::OK)
}
