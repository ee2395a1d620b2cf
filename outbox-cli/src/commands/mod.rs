//! The commands other than `relay` and `doctor`: a file per command or group of commands,
//! `run` only picks one.

use super::*;
use crate::output::{print_statements, unit_json};
use outbox_core::StoreAdmin;

mod clean;
mod console;
mod dead;
mod grants;
mod inbox;
mod migrate;
mod stats;
mod units;

use clean::clean;
use console::admin_console;
use dead::dead;
use grants::grants;
use inbox::inbox;
use migrate::{migrate, print_sql};
use stats::stats;
use units::{park, parked, resume, skip};

/// Run the command `cli` names with the settings of `file`: its exit code, or the error.
pub(crate) async fn run(cli: Cli, file: FileConfig) -> Result<u8, Error> {
    let output = if cli.json {
        Output::Json
    } else {
        cli.output.or(file.output).unwrap_or_default()
    };
    let table = cli
        .table
        .clone()
        .or(file.table.clone())
        .unwrap_or_else(|| "outbox".into());
    // Commands over a list of stores (--stores, --stores-query) need no --store.
    match cli.command {
        Command::Relay(args) if args.list.given() => {
            let source = crate::fleet_cmd::Source::of(&args.list)?;
            return crate::fleet_cmd::relay(source, &table, *args, file.relay).await;
        }
        Command::Doctor(args) if args.list.given() => {
            let source = crate::fleet_cmd::Source::of(&args.list)?;
            let stores = source
                .read(&table)
                .await?
                .into_iter()
                .map(|(name, m)| (name, m.url, m.table))
                .collect();
            let (publisher_url, signing) = doctor_inputs(args, &file)?;
            let checks = doctor::examine_list(stores, publisher_url, signing).await;
            return Ok(if doctor::print(&checks, output) {
                exit::OK
            } else {
                exit::FAILED
            });
        }
        Command::Admin(args) if args.list.given() => {
            let source = crate::fleet_cmd::Source::of(&args.list)?;
            return console::admin_stores(source, &table, args).await;
        }
        Command::Stats { list, .. } if list.given() => {
            let source = crate::fleet_cmd::Source::of(&list)?;
            return crate::fleet_cmd::stats(source, &table, output == Output::Json).await;
        }
        _ => {}
    }
    let store_url = first_of(
        cli.store,
        &cli.store_file,
        file.store.clone(),
        &file.store_file,
        "store",
    )?
    .ok_or_else(|| {
        Error::config(
            "no store: pass --store URL or --store-file PATH, set OUTBOX_STORE or OUTBOX_STORE_FILE, or set store in --config",
        )
    })?;
    // Commands that open nothing, or open what they need themselves.
    match cli.command {
        Command::Doctor(args) => return doctor(&store_url, &table, args, &file, output).await,
        Command::Relay(args) => {
            return crate::relay_cmd::relay(&store_url, &table, *args, file.relay).await
        }
        Command::Grants(args) => return grants(&store_url, &table, &args, output),
        Command::Migrate {
            print_sql: true,
            inboxes,
            wal,
            wal_names,
        } => {
            let wal = wal.then_some(&wal_names);
            return print_sql(&store_url, &table, &inboxes, wal, output).await;
        }
        Command::Completions { .. } | Command::Man => return Ok(exit::OK),
        _ => {}
    }
    let create = matches!(cli.command, Command::Migrate { .. });
    let store = AnyStore::open(&store_url, &table, create).await?;
    let json = output == Output::Json;
    match cli.command {
        Command::Migrate {
            inboxes,
            wal,
            wal_names,
            ..
        } => {
            let wal = wal.then_some(&wal_names);
            migrate(&store, &table, &inboxes, wal, json).await
        }
        Command::Clean(args) => clean(&store, args, &file, json).await,
        Command::Stats { wal, wal_names, .. } => {
            let slot = wal.then_some(wal_names.slot.as_str());
            stats(&store, &table, slot, json).await
        }
        Command::Admin(args) => admin_console(&store, &store_url, &table, args).await,
        Command::Parked { stream, limit } => parked(&store, stream, limit, json).await,
        Command::Park {
            stream,
            unit,
            reason,
        } => park(&store, stream, unit, reason, json).await,
        Command::Resume { stream, unit } => resume(&store, stream, unit, json).await,
        Command::Skip { stream, unit } => skip(&store, stream, unit, json).await,
        Command::Inbox {
            inbox_table,
            command,
        } => inbox(&store, inbox_table, command, json).await,
        Command::Dead { command } => dead(&store, command, json).await,
        Command::Doctor(_)
        | Command::Relay(_)
        | Command::Grants(_)
        | Command::Completions { .. }
        | Command::Man => Ok(exit::OK), // handled above
    }
}

/// `outbox doctor`: every check of a deployment, printed; exit 1 if one failed.
async fn doctor(
    store_url: &str,
    table: &str,
    args: DoctorArgs,
    file: &FileConfig,
    output: Output,
) -> Result<u8, Error> {
    let wal = args.wal.then_some(args.wal_names.clone());
    let (publisher_url, signing) = doctor_inputs(args, file)?;
    let checks = doctor::examine(doctor::Setup {
        store_url,
        table,
        publisher_url,
        signing,
        wal: wal.as_ref(),
    })
    .await;
    Ok(if doctor::print(&checks, output) {
        exit::OK
    } else {
        exit::FAILED
    })
}

/// What `doctor` checks besides stores: the publisher URL and the signing keys.
#[allow(clippy::type_complexity)]
fn doctor_inputs(
    args: DoctorArgs,
    file: &FileConfig,
) -> Result<(Option<String>, Result<Option<outbox_core::Signer>, Error>), Error> {
    let publisher_url = first_of(
        args.publisher,
        &args.publisher_file,
        file.relay.publisher.clone(),
        &file.relay.publisher_file,
        "publisher",
    )?;
    let signing = signing::load(
        args.signing_keys_file.as_deref(),
        std::env::var("OUTBOX_SIGNING_KEYS").ok().as_deref(),
        file.relay.signing_keys_file.as_deref(),
        file.relay.signing_keys.as_deref(),
    );
    Ok((publisher_url, signing))
}
