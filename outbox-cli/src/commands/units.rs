//! `outbox parked`, `park`, `resume` and `skip`: keep-order units an operator stops and
//! starts.

use super::*;

/// `outbox parked`: the parked units.
pub(super) async fn parked(
    store: &AnyStore,
    stream: Option<String>,
    limit: usize,
    json: bool,
) -> Result<u8, Error> {
    store.require_table().await?;
    let units = store.store().parked_units(stream.as_deref(), limit).await?;
    let now = SystemTime::now();
    if json {
        println!("{}", json::parked(&units));
        return Ok(exit::OK);
    }
    for u in units {
        let age = now
            .duration_since(u.parked_at)
            .map(|d| humantime::format_duration(Duration::from_secs(d.as_secs())).to_string())
            .unwrap_or_else(|_| "0s".into());
        let more = if u.pending >= outbox_core::PARKED_COUNT_CAP {
            "+"
        } else {
            ""
        };
        println!(
            "stream={} unit={} parked={age} ago pending={}{more} head_seq={} reason={}",
            printable(&u.stream),
            printable(&u.unit),
            u.pending,
            u.head.map_or_else(|| "-".to_owned(), |h| h.to_string()),
            printable(&u.reason.unwrap_or_default())
        );
    }
    Ok(exit::OK)
}

/// `outbox park`.
pub(super) async fn park(
    store: &AnyStore,
    stream: String,
    unit: String,
    reason: String,
    json: bool,
) -> Result<u8, Error> {
    store.require_table().await?;
    store.store().park_unit(&stream, &unit, &reason).await?;
    tracing::info!(stream = %printable(&stream), unit = %printable(&unit), "unit parked");
    let said = format!(
        "parked unit {:?} of stream {:?}",
        printable(&unit),
        printable(&stream)
    );
    if json {
        println!(
            "{}",
            unit_json(json::action("park", 1, &said), &stream, &unit)
        );
    } else {
        println!("{said}");
    }
    Ok(exit::OK)
}

/// `outbox resume`.
pub(super) async fn resume(
    store: &AnyStore,
    stream: String,
    unit: String,
    json: bool,
) -> Result<u8, Error> {
    store.require_table().await?;
    store.store().resume_unit(&stream, &unit).await?;
    tracing::info!(stream = %printable(&stream), unit = %printable(&unit), "unit resumed");
    let said = format!(
        "resumed unit {:?} of stream {:?}",
        printable(&unit),
        printable(&stream)
    );
    if json {
        println!(
            "{}",
            unit_json(json::action("resume", 1, &said), &stream, &unit)
        );
    } else {
        println!("{said}");
    }
    Ok(exit::OK)
}

/// `outbox skip`.
pub(super) async fn skip(
    store: &AnyStore,
    stream: String,
    unit: String,
    json: bool,
) -> Result<u8, Error> {
    store.require_table().await?;
    let head = store.store().skip_head(&stream, &unit).await?;
    tracing::info!(stream = %printable(&stream), unit = %printable(&unit), head = %head.map_or_else(|| "-".to_owned(), |h| h.to_string()), "head skipped, unit resumed");
    let said = match head {
        Some(seq) => format!(
            "dead-lettered seq {seq} and resumed unit {:?} of stream {:?}",
            printable(&unit),
            printable(&stream)
        ),
        None => format!(
            "unit {:?} of stream {:?} had no pending message; resumed",
            printable(&unit),
            printable(&stream)
        ),
    };
    if json {
        let mut doc = unit_json(
            json::action("skip", u64::from(head.is_some()), &said),
            &stream,
            &unit,
        );
        doc["dead_lettered_seq"] = serde_json::json!(head);
        println!("{doc}");
    } else {
        println!("{said}");
    }
    Ok(exit::OK)
}
