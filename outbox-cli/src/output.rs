//! What the commands print besides errors: generated documents, SQL for a DBA, a relay's
//! counts, an action's JSON.

use super::*;

/// Write a generated document to stdout. A reader that stops early (`| head`) is not an
/// error (exit 0, as for `cat`); any other write error is.
pub(crate) fn write_out(text: &[u8], what: &str) -> ExitCode {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: cannot write {what}: {e}");
            ExitCode::from(exit::FAILED)
        }
    }
}

/// An action's document with the unit it took.
pub(crate) fn unit_json(mut doc: serde_json::Value, stream: &str, unit: &str) -> serde_json::Value {
    doc["stream"] = serde_json::json!(stream);
    doc["unit"] = serde_json::json!(unit);
    doc
}

/// A relay's counts as log fields (not a `Debug` value).
pub(crate) fn log_report(r: &outbox_core::BatchReport, what: &str) {
    tracing::info!(
        claimed = r.claimed,
        published = r.published,
        failed = r.failed,
        dead = r.dead,
        released = r.released,
        quarantined = r.quarantined,
        parked = r.parked,
        "{what}"
    );
}

/// SQL statements for a DBA: one per paragraph, `;`-terminated, after a comment; or a JSON
/// document `{"statements": [...]}`.
pub(crate) fn print_statements(statements: &[String], output: Output, what: &str) {
    match output {
        Output::Json => println!("{}", serde_json::json!({ "statements": statements })),
        Output::Text => {
            println!("-- {what}");
            for s in statements {
                println!("{s};\n");
            }
        }
    }
}

/// One line on a WAL relay's slot, for `stats --wal` and the console: the WAL it keeps,
/// whether a relay reads it, and the lag the server measured.
pub(crate) fn wal_line(slot: &str, lag: &outbox_sql::postgres::wal::SlotLag) -> String {
    let reader = match (lag.active, lag.lag) {
        (false, _) => "no relay is reading it".to_owned(),
        (true, None) => "a relay is reading it".to_owned(),
        (true, Some(d)) => format!(
            "a relay is reading it, {:.3} s behind (flush lag)",
            d.as_secs_f64()
        ),
    };
    format!(
        "WAL slot {slot}: keeps {} KiB of WAL on the server; {reader}",
        lag.retained_bytes >> 10
    )
}
