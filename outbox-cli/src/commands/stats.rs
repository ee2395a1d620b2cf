//! `outbox stats`: counts per stream.

use super::*;

/// `outbox stats`: counts per stream.
pub(super) async fn stats(store: &AnyStore, table: &str, json: bool) -> Result<u8, Error> {
    store.require_table().await?;
    let stats = store.store().stats().await?;
    let now = SystemTime::now();
    let age =
        |s: &outbox_core::StreamStats| s.oldest_pending.and_then(|t| now.duration_since(t).ok());
    if json {
        println!("{}", json::stats(table, &stats, now));
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
    Ok(exit::OK)
}
