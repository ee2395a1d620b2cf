//! `outbox migrate` (the schema made or brought up to date, the steps it applied) and
//! `migrate --print-sql` (the DDL, for a DBA).

use super::*;

/// `outbox migrate --print-sql`: the DDL, printed, nothing changed.
pub(super) async fn print_sql(
    store_url: &str,
    table: &str,
    inboxes: &[String],
    wal: Option<&WalNames>,
    output: Output,
) -> Result<u8, Error> {
    if !inboxes.is_empty() {
        return Err(Error::config(
            "migrate --print-sql prints the outbox's tables; create inbox tables with `outbox migrate --inbox` as their owner",
        ));
    }
    let statements = match backends::scheme(store_url) {
        "postgres" | "postgresql" => {
            let mut all = outbox_sql::postgres::PgStore::schema_sql(table)?;
            match wal {
                Some(w) if w.wal_rows => all.extend(outbox_sql::postgres::wal::setup_sql_rows(
                    &w.slot,
                    &w.publication,
                    table,
                )?),
                Some(w) => all.extend(outbox_sql::postgres::wal::setup_sql(
                    &w.slot,
                    &w.publication,
                )?),
                None => {}
            }
            all
        }
        _ if wal.is_some() => {
            return Err(Error::config(
                "--wal: the WAL relay reads PostgreSQL's write-ahead log; the store must be postgres://…",
            ))
        }
        "mysql" | "mariadb" => match AnyStore::open(store_url, table, false).await? {
            AnyStore::MySql(s) => s.schema_sql().await?,
            _ => unreachable!("a mysql:// URL opens a MySQL store"),
        },
        _ => {
            return Err(Error::config(
                "migrate --print-sql: SQLite has no roles to separate; run `outbox migrate`",
            ))
        }
    };
    print_statements(
        &statements,
        output,
        "The outbox's tables: run as their owner; every statement is idempotent. Upgrades of existing tables: run `outbox migrate` as the owner.",
    );
    Ok(exit::OK)
}

/// `outbox migrate`: the table (and inbox tables) made or upgraded.
pub(super) async fn migrate(
    store: &AnyStore,
    table: &str,
    inboxes: &[String],
    wal: Option<&WalNames>,
    json: bool,
) -> Result<u8, Error> {
    let started = std::time::Instant::now();
    if store.table_exists().await? {
        tracing::info!(table = %table, "upgrading the table in place if needed (a large table of version 0.1 takes a while)");
    } else {
        tracing::info!(table = %table, "creating the table");
    }
    let before = if store.table_exists().await? {
        store.store().schema().await?.version
    } else {
        None
    };
    store.store().migrate().await?;
    let version = store.store().schema().await?.version;
    let applied: Vec<u32> = outbox_core::SCHEMA_STEPS
        .iter()
        .map(|s| s.version)
        .filter(|&v| v > before.unwrap_or(0) && Some(v) <= version)
        .collect();
    if let Some(w) = wal {
        let AnyStore::Postgres(pg) = store else {
            return Err(Error::config(
                "--wal: the WAL relay reads PostgreSQL's write-ahead log; the store must be postgres://…",
            ));
        };
        let wal = if w.wal_rows {
            outbox_sql::postgres::wal::WalStore::rows(pg.clone())
        } else {
            outbox_sql::postgres::wal::WalStore::new(pg.clone(), &w.wal_prefix)?
        };
        wal.setup(&w.slot, &w.publication).await?;
        if !json {
            println!(
                "WAL relay: publication {} and slot {} are ready",
                w.publication, w.slot
            );
        }
    }
    for inbox in inboxes {
        store.inbox_table(inbox)?.migrate().await?;
        if !json {
            println!("inbox table {inbox} is ready");
        }
    }
    if json {
        println!(
            "{}",
            serde_json::json!({"table": table, "ready": true, "schema_version": version, "applied": applied, "seconds": started.elapsed().as_secs_f64()})
        );
    } else {
        let steps = match applied.as_slice() {
            [] => "no step to apply".to_owned(),
            [one] => format!("applied step {one}"),
            many => format!(
                "applied steps {}",
                many.iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        println!(
            "table {table} is ready (schema version {}; {steps})",
            version.unwrap_or_default()
        );
    }
    Ok(exit::OK)
}
