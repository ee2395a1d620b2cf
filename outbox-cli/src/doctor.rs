//! `outbox doctor`: check a deployment end to end before the relay runs.

use std::time::Duration;

use outbox_core::{redact_url, Publisher};
use serde::Serialize;

use crate::backends::{open_publisher, AnyStore, CliStore};
use crate::report::{describe, Output};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    Ok,
    Warn,
    Fail,
    Skip,
}

#[derive(Debug, Serialize)]
pub struct Check {
    /// The store of a list (`doctor --stores`) the check is about.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    pub check: &'static str,
    pub status: Status,
    pub detail: String,
}

/// What the doctor looks at.
pub struct Setup<'a> {
    pub store_url: &'a str,
    pub table: &'a str,
    pub publisher_url: Option<String>,
    /// The signing keys as the relay would load them.
    pub signing: Result<Option<outbox_core::Signer>, outbox_core::Error>,
    /// The WAL relay's names, when it is checked too.
    pub wal: Option<&'a crate::cli::WalNames>,
}

/// WAL kept by a slot past which the doctor warns (an abandoned slot fills the disk).
const WAL_RETAINED_WARN: u64 = 1 << 30;

async fn wal_check(store: &AnyStore, names: &crate::cli::WalNames) -> Check {
    let AnyStore::Postgres(pg) = store else {
        return check(
            "wal",
            Status::Fail,
            "the WAL relay needs a PostgreSQL store",
        );
    };
    let h =
        match outbox_sql::postgres::wal::health(pg.pool(), &names.slot, &names.publication).await {
            Ok(h) => h,
            Err(e) => return check("wal", Status::Fail, describe(&e)),
        };
    let (slot, publication) = (&names.slot, &names.publication);
    if h.wal_level != "logical" {
        return check(
            "wal",
            Status::Fail,
            format!(
                "wal_level is {}: set wal_level = logical and restart the server",
                h.wal_level
            ),
        );
    }
    if !h.publication {
        return check(
            "wal",
            Status::Fail,
            format!("publication {publication} does not exist: run `outbox migrate --wal`"),
        );
    }
    if names.wal_rows {
        // Table mode: the messages are rows of `<table>_wal`, which the publication must carry.
        let wal_table = format!("{}_wal", pg.table());
        let bare = wal_table.rsplit('.').next().unwrap_or(&wal_table);
        if !h.published_tables.iter().any(|t| t == bare) {
            return check(
                "wal",
                Status::Fail,
                format!("publication {publication} does not publish {wal_table} (table mode, --wal-rows): run `outbox migrate --wal --wal-rows`"),
            );
        }
    }
    match h.slot {
        None => check("wal", Status::Fail, format!("slot {slot} does not exist: run `outbox migrate --wal`")),
        Some((plugin, _)) if plugin != "pgoutput" => check("wal", Status::Fail, format!("slot {slot} uses plugin {plugin}, not pgoutput: drop it and run `outbox migrate --wal`")),
        Some((_, lag)) if lag.retained_bytes > WAL_RETAINED_WARN => check(
            "wal",
            Status::Warn,
            format!("slot {slot} keeps {} MiB of WAL on the server ({}): is its relay running?", lag.retained_bytes >> 20, if lag.active { "a relay is reading" } else { "no relay is reading" }),
        ),
        Some((_, lag)) => check(
            "wal",
            Status::Ok,
            format!(
                "wal_level logical, publication {publication}{}, slot {slot} keeping {} KiB of WAL ({})",
                if names.wal_rows { format!(" of {}_wal", pg.table()) } else { String::new() },
                lag.retained_bytes >> 10,
                match (lag.active, lag.lag) {
                    (false, _) => "no relay is reading now".to_owned(),
                    (true, None) => "a relay is reading".to_owned(),
                    (true, Some(d)) => format!("a relay is reading, {:.3} s behind", d.as_secs_f64()),
                }
            ),
        ),
    }
}

fn check(name: &'static str, status: Status, detail: impl Into<String>) -> Check {
    Check {
        store: None,
        check: name,
        status,
        detail: detail.into(),
    }
}

/// Run every check; later checks that need an earlier one are skipped when it failed.
pub async fn examine(setup: Setup<'_>) -> Vec<Check> {
    let mut out = store_part(setup.store_url, setup.table, setup.wal).await;
    out.extend(shared_part(setup.publisher_url.as_deref(), setup.signing).await);
    out
}

/// `doctor --stores`: the store checks of every store of a list (at once, each named in its
/// checks), then the publisher and signing checks once.
pub async fn examine_list(
    stores: Vec<(String, String, String)>,
    publisher_url: Option<String>,
    signing: Result<Option<outbox_core::Signer>, outbox_core::Error>,
) -> Vec<Check> {
    let parts = stores.into_iter().map(|(name, url, table)| async move {
        let mut checks = store_part(&url, &table, None).await;
        for c in &mut checks {
            c.store = Some(name.clone());
        }
        checks
    });
    let mut out: Vec<Check> = futures_util::future::join_all(parts)
        .await
        .into_iter()
        .flatten()
        .collect();
    out.extend(shared_part(publisher_url.as_deref(), signing).await);
    out
}

/// The checks of one store: reachable, its table, schema, wake-up and clock (and the WAL
/// relay's set-up when `wal` names it).
async fn store_part(url: &str, table: &str, wal: Option<&crate::cli::WalNames>) -> Vec<Check> {
    let mut out = Vec::new();
    let shown = redact_url(url);
    match AnyStore::open(url, table, false).await {
        Err(e) => {
            out.push(check(
                "store",
                Status::Fail,
                format!("{shown}: {}", describe(&e)),
            ));
            for name in ["table", "schema", "notify", "clock"] {
                out.push(check(name, Status::Skip, "the store is not reachable"));
            }
        }
        Ok(store) => {
            out.push(check("store", Status::Ok, format!("reachable: {shown}")));
            store_checks(&store, &mut out).await;
            if let Some(names) = wal {
                out.push(wal_check(&store, names).await);
            }
        }
    }
    out
}

/// The checks that do not depend on a store: the publisher and the signing keys.
async fn shared_part(
    publisher_url: Option<&str>,
    signing: Result<Option<outbox_core::Signer>, outbox_core::Error>,
) -> Vec<Check> {
    let mut out = vec![publisher_check(publisher_url).await];
    out.push(match signing {
        Err(e) => check("signing", Status::Fail, describe(&e)),
        Ok(None) => check(
            "signing",
            Status::Ok,
            "off: signed rows would be refused as unverifiable",
        ),
        Ok(Some(s)) => check(
            "signing",
            Status::Ok,
            format!(
                "{} key(s) loaded: {}",
                s.key_ids().count(),
                s.key_ids().collect::<Vec<_>>().join(", ")
            ),
        ),
    });
    out
}

async fn store_checks(store: &AnyStore, out: &mut Vec<Check>) {
    let table = store.table().to_owned();
    match store.require_table().await {
        Ok(()) => out.push(check("table", Status::Ok, format!("{table} exists"))),
        Err(e) => {
            out.push(check("table", Status::Fail, describe(&e)));
            out.push(check("schema", Status::Skip, "no table"));
        }
    }
    if out
        .last()
        .is_some_and(|c| c.check == "table" && c.status == Status::Ok)
    {
        out.push(match store.store().schema().await {
            Err(e) => check("schema", Status::Fail, describe(&e)),
            Ok(s) if !s.missing.is_empty() => check(
                "schema",
                Status::Fail,
                format!("missing {}: run `outbox migrate`", s.missing.join(", ")),
            ),
            Ok(s) if !s.legacy.is_empty() => check(
                "schema",
                Status::Warn,
                format!(
                    "left from an older version: {}; stop old relays, then run `outbox migrate`",
                    s.legacy.join(", ")
                ),
            ),
            Ok(s) if s.version != Some(outbox_core::SCHEMA_VERSION) => check(
                "schema",
                Status::Fail,
                match s.version {
                    Some(v) if v > outbox_core::SCHEMA_VERSION => format!(
                        "schema version {v} is newer than this build knows ({}): run a newer outbox",
                        outbox_core::SCHEMA_VERSION
                    ),
                    Some(v) => format!(
                        "schema version {v}, this build needs {}: run `outbox migrate`",
                        outbox_core::SCHEMA_VERSION
                    ),
                    None => "no schema version recorded: run `outbox migrate`".to_owned(),
                },
            ),
            Ok(s) => check(
                "schema",
                Status::Ok,
                format!(
                    "current: version {}, every table and index present",
                    s.version.unwrap_or_default()
                ),
            ),
        });
    }
    out.push(match store.notify_roundtrip(Duration::from_secs(5)).await {
        None => check(
            "notify",
            Status::Skip,
            "this store has no cross-process wake-up; relays poll",
        ),
        Some(Ok(took)) => check(
            "notify",
            Status::Ok,
            format!("LISTEN/NOTIFY round trip in {took:.1?}"),
        ),
        Some(Err(e)) => check(
            "notify",
            Status::Warn,
            format!(
                "{}: relays fall back to polling (commits wait up to the poll interval)",
                describe(&e)
            ),
        ),
    });
    out.push(match store.clock_skew().await {
        None => check("clock", Status::Ok, "embedded database: this host's clock"),
        Some(Err(e)) => check("clock", Status::Warn, describe(&e)),
        Some(Ok(skew)) => {
            let ms = skew.as_millis();
            if skew > Duration::from_secs(2) {
                check(
                    "clock",
                    Status::Warn,
                    format!("this host and the database differ by {ms} ms: message created_at times are this host's; leases use the database clock"),
                )
            } else {
                check("clock", Status::Ok, format!("within {ms} ms of the database"))
            }
        }
    });
}

async fn publisher_check(url: Option<&str>) -> Check {
    let Some(url) = url else {
        return check(
            "publisher",
            Status::Skip,
            "none given (pass --publisher, OUTBOX_PUBLISHER or relay.publisher to check one)",
        );
    };
    let shown = redact_url(url);
    let attempt = async {
        let p = open_publisher(url).await?;
        p.check().await
    };
    match tokio::time::timeout(Duration::from_secs(20), attempt).await {
        Ok(Ok(())) => check("publisher", Status::Ok, format!("reachable: {shown}")),
        Ok(Err(e)) => check(
            "publisher",
            Status::Fail,
            format!("{shown}: {}", describe(&e)),
        ),
        Err(_) => check(
            "publisher",
            Status::Fail,
            format!("{shown}: no answer within 20 s"),
        ),
    }
}

/// Print the checks; true when none failed.
pub fn print(checks: &[Check], output: Output) -> bool {
    let ok = checks.iter().all(|c| c.status != Status::Fail);
    match output {
        Output::Json => println!("{}", serde_json::json!({ "ok": ok, "checks": checks })),
        Output::Text => {
            for c in checks {
                let status = match c.status {
                    Status::Ok => "OK",
                    Status::Warn => "WARN",
                    Status::Fail => "FAIL",
                    Status::Skip => "SKIP",
                };
                let store = c
                    .store
                    .as_deref()
                    .map(|s| format!("[{}] ", outbox_core::printable(s)))
                    .unwrap_or_default();
                println!(
                    "{status:<5} {store}{:<10} {}",
                    c.check,
                    outbox_core::printable(&c.detail)
                );
            }
        }
    }
    ok
}
