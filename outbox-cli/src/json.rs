//! The JSON documents of the command (`--json`) and of the console's API (`/api/`): one
//! function per figure, so both print the same names with the same meanings (the README's
//! "JSON documents" table lists them).

use std::time::SystemTime;

use outbox_core::{to_millis, ParkedUnit, Stats, StoredMessage, StreamStats};
use serde_json::{json, Value};

/// One stream's counts: `oldest_pending_at_ms` is when the oldest pending row was written
/// (epoch milliseconds, the database's clock), `oldest_pending_seconds` how long ago that was.
pub fn stream_stats(s: &StreamStats, now: SystemTime) -> Value {
    json!({
        "stream": s.stream,
        "pending": s.pending,
        "sent": s.sent,
        "dead": s.dead,
        "oldest_pending_at_ms": s.oldest_pending.map(to_millis),
        "oldest_pending_seconds": s
            .oldest_pending
            .map(|t| now.duration_since(t).unwrap_or_default().as_secs_f64()),
    })
}

/// `stats --json`, `GET /api/stats`.
pub fn stats(table: &str, stats: &Stats, now: SystemTime) -> Value {
    json!({
        "table": table,
        "streams": stats.streams.iter().map(|s| stream_stats(s, now)).collect::<Vec<_>>(),
        "total": stream_stats(&stats.total(), now),
    })
}

/// `parked --json`, `GET /api/parked`.
pub fn parked(units: &[ParkedUnit]) -> Value {
    json!({
        "parked": units.iter().map(|u| json!({
            "stream": u.stream,
            "unit": u.unit,
            "parked_at_ms": to_millis(u.parked_at),
            "reason": u.reason,
            "head_seq": u.head,
            "pending": u.pending,
            "pending_capped": u.pending >= outbox_core::PARKED_COUNT_CAP,
        })).collect::<Vec<_>>()
    })
}

/// One message: `GET /api/messages/{seq}`, and each row of a listing. `hide` leaves out the
/// payload, header values and the last error (`--hide-payloads`).
pub fn message(m: &StoredMessage, hide: bool) -> Value {
    let msg = &m.envelope.message;
    let payload = if hide {
        Value::Null
    } else {
        match std::str::from_utf8(&msg.payload) {
            Ok(t) => json!({ "text": t }),
            Err(_) => json!({
                "hex": msg.payload.iter().map(|b| format!("{b:02x}")).collect::<String>()
            }),
        }
    };
    let headers: serde_json::Map<String, Value> = msg
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), if hide { Value::Null } else { json!(v) }))
        .collect();
    json!({
        "seq": m.seq,
        "id": m.envelope.id.to_string(),
        "stream": msg.stream,
        "destination": msg.destination,
        "key": msg.key,
        "unit": m.unit,
        "status": m.status.as_str(),
        "attempts": m.attempts,
        "created_at_ms": to_millis(m.envelope.created_at),
        "next_attempt_at_ms": to_millis(m.next_attempt_at),
        "sent_at_ms": m.sent_at.map(to_millis),
        "last_error": if hide { None } else { m.last_error.clone() },
        "content_type": msg.content_type,
        "headers": headers,
        "signed": m.signature.is_some(),
        "payload": payload,
    })
}

/// A page of messages, newest first: `dead list --json`, `GET /api/messages`. `next_before`
/// continues the listing (the `before` of the next page), `null` on the last page.
pub fn messages(rows: &[StoredMessage], limit: usize, hide: bool) -> Value {
    let next = (rows.len() == limit)
        .then(|| rows.last().map(|m| m.seq))
        .flatten();
    json!({
        "messages": rows.iter().map(|m| message(m, hide)).collect::<Vec<_>>(),
        "next_before": next,
    })
}

/// What an action did: `park`, `resume`, `skip` (`--json`), `POST /api/actions`.
pub fn action(action: &str, changed: u64, message: &str) -> Value {
    json!({ "action": action, "changed": changed, "message": message })
}

/// A WAL relay's slot, for `stats --wal --json` and the console's `/api/stats`: the WAL it
/// keeps, whether a relay reads it, the lag the server measured (null when unknown), or
/// `exists: false`.
pub(crate) fn wal(slot: &str, lag: Option<&outbox_sql::postgres::wal::SlotLag>) -> Value {
    match lag {
        Some(lag) => json!({
            "slot": slot,
            "exists": true,
            "retained_bytes": lag.retained_bytes,
            "active": lag.active,
            "lag_seconds": lag.lag.map(|d| d.as_secs_f64()),
        }),
        None => json!({ "slot": slot, "exists": false }),
    }
}
