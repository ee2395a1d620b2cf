//! The commands other than `relay`: each a function of its own, `run` only picks one.

use super::*;
use crate::output::{print_statements, unit_json};
use outbox_core::StoreAdmin;

/// Run the command `cli` names with the settings of `file`: its exit code, or the error.
pub(crate) async fn run(cli: Cli, file: FileConfig) -> Result<u8, Error> {
    let output = if cli.json {
        Output::Json
    } else {
        cli.output.or(file.output).unwrap_or_default()
    };
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
    let table = cli
        .table
        .or(file.table.clone())
        .unwrap_or_else(|| "outbox".into());
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
        } => return print_sql(&store_url, &table, &inboxes, output).await,
        Command::Completions { .. } | Command::Man => return Ok(exit::OK),
        _ => {}
    }
    let create = matches!(cli.command, Command::Migrate { .. });
    let store = AnyStore::open(&store_url, &table, create).await?;
    let json = output == Output::Json;
    match cli.command {
        Command::Migrate { inboxes, .. } => migrate(&store, &table, &inboxes, json).await,
        Command::Clean(args) => clean(&store, args, &file, json).await,
        Command::Stats => stats(&store, &table, json).await,
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
    let checks = doctor::examine(doctor::Setup {
        store_url,
        table,
        publisher_url,
        signing,
    })
    .await;
    Ok(if doctor::print(&checks, output) {
        exit::OK
    } else {
        exit::FAILED
    })
}

/// `outbox grants`: the GRANTs of each role, printed.
fn grants(store_url: &str, table: &str, args: &GrantsArgs, output: Output) -> Result<u8, Error> {
    let roles = outbox_sql::roles::Roles {
        writer: args.writer.clone(),
        relay: args.relay.clone(),
        admin: args.admin.clone(),
    };
    if roles == outbox_sql::roles::Roles::default() {
        return Err(Error::config(
            "grants: name at least one role: --writer, --relay or --admin",
        ));
    }
    let statements = match backends::scheme(store_url) {
        "postgres" | "postgresql" => outbox_sql::roles::postgres(table, &roles)?,
        "mysql" | "mariadb" => {
            let database = backends::database_of(store_url).ok_or_else(|| {
                Error::config("grants: the store URL names no database (mysql://host/DATABASE)")
            })?;
            outbox_sql::roles::mysql(&database, table, &args.account_host, &roles)?
        }
        _ => {
            return Err(Error::config(
                "grants: SQLite has no roles; grants are for postgres:// and mysql:// stores",
            ))
        }
    };
    print_statements(
        &statements,
        output,
        "Grants: run as the tables' owner (or a role that may grant on them).",
    );
    Ok(exit::OK)
}

/// `outbox migrate --print-sql`: the DDL, printed, nothing changed.
async fn print_sql(
    store_url: &str,
    table: &str,
    inboxes: &[String],
    output: Output,
) -> Result<u8, Error> {
    if !inboxes.is_empty() {
        return Err(Error::config(
            "migrate --print-sql prints the outbox's tables; create inbox tables with `outbox migrate --inbox` as their owner",
        ));
    }
    let statements = match backends::scheme(store_url) {
        "postgres" | "postgresql" => outbox_sql::postgres::PgStore::schema_sql(table)?,
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
async fn migrate(
    store: &AnyStore,
    table: &str,
    inboxes: &[String],
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

/// `outbox clean`: sent rows (and inbox marks) past their retention deleted, in batches.
async fn clean(
    store: &AnyStore,
    args: CleanArgs,
    file: &FileConfig,
    json: bool,
) -> Result<u8, Error> {
    store.require_table().await?;
    let older_than = args
        .older_than
        .or(duration("clean.older_than", file.clean.older_than.clone())?);
    let mut cleaner = Cleaner::new(store.store()).include_dead(args.include_dead);
    for inbox in &args.inboxes {
        cleaner = cleaner.inbox(
            store.inbox_table(inbox)?,
            args.inbox_older_than.unwrap_or(DEFAULT_INBOX_RETENTION),
        );
    }
    if let Some(r) = older_than {
        cleaner = cleaner.retention(r);
    }
    if let Some(b) = args.batch.or(file.clean.batch) {
        cleaner = cleaner.batch_size(b)?;
    }
    let interrupt = report::Interrupt::catch();
    let mut progress = report::Progress::new("clean");
    let (n, finished) = cleaner
        .run_once_with(|done| {
            progress.update(done);
            !interrupt.asked()
        })
        .await?;
    progress.finish();
    if json {
        println!(
            "{}",
            serde_json::json!({"deleted": n, "finished": finished})
        );
    } else if finished {
        println!("deleted {n} rows");
    } else {
        println!("deleted {n} rows, then stopped (interrupted); run it again to go on");
    }
    Ok(if finished {
        exit::OK
    } else {
        exit::INTERRUPTED
    })
}

/// `outbox stats`: counts per stream.
async fn stats(store: &AnyStore, table: &str, json: bool) -> Result<u8, Error> {
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

/// `outbox admin`: the console, until a stop signal.
async fn admin_console(
    store: &AnyStore,
    store_url: &str,
    table: &str,
    args: AdminArgs,
) -> Result<u8, Error> {
    let token = match (&args.auth_token, &args.auth_token_file) {
        (_, Some(file)) => {
            let text = std::fs::read_to_string(file).map_err(|e| {
                Error::config(format!(
                    "admin: cannot read the token file {}",
                    file.display()
                ))
                .with_source(e)
            })?;
            Some(text.lines().next().unwrap_or("").trim().to_owned())
        }
        (token, None) => token.clone(),
    };
    let options = admin::AdminOptions {
        listen: args.listen,
        token,
        read_only: args.read_only,
        hide_payloads: args.hide_payloads,
        sample_every: args.sample_every.max(Duration::from_millis(100)),
    };
    admin::check(&options)?;
    store.require_table().await?;
    let label = outbox_core::redact_url(store_url);
    admin::serve(store.store(), table, label, options, async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async {
                match term.as_mut() {
                    Some(t) => { t.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {}
        }
    })
    .await?;
    Ok(exit::OK)
}

/// `outbox parked`: the parked units.
async fn parked(
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
async fn park(
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
async fn resume(store: &AnyStore, stream: String, unit: String, json: bool) -> Result<u8, Error> {
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
async fn skip(store: &AnyStore, stream: String, unit: String, json: bool) -> Result<u8, Error> {
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

/// `outbox inbox dead|requeue`.
async fn inbox(
    store: &AnyStore,
    inbox_table: String,
    command: InboxCommand,
    json: bool,
) -> Result<u8, Error> {
    let inbox = store.inbox_table(&inbox_table)?;
    match command {
        InboxCommand::Dead { consumer, limit } => {
            let dead = inbox.dead_letters(consumer.as_deref(), limit).await?;
            if json {
                let rows: Vec<_> = dead
                    .iter()
                    .map(|d| {
                        serde_json::json!({
                            "consumer": d.consumer,
                            "id": d.message.id.to_string(),
                            "source": d.message.source,
                            "stream": d.message.stream,
                            "key": d.message.key,
                            "attempts": d.attempts,
                            "error": d.error,
                            "first_seen_at_ms": outbox_core::to_millis(d.first_seen_at),
                        })
                    })
                    .collect();
                println!("{}", serde_json::json!({ "dead_letters": rows }));
                return Ok(exit::OK);
            }
            for d in dead {
                println!(
                    "consumer={} id={} source={} attempts={} error={}",
                    printable(&d.consumer),
                    d.message.id,
                    printable(&d.message.source),
                    d.attempts,
                    printable(&d.error.unwrap_or_default())
                );
            }
            Ok(exit::OK)
        }
        InboxCommand::Requeue { consumer, id } => {
            let id: outbox_core::MessageId = id
                .parse()
                .map_err(|_| Error::config(format!("{:?} is not a message id", printable(&id))))?;
            inbox.requeue(&consumer, id).await?;
            if json {
                println!("{}", serde_json::json!({"requeued": id.to_string()}));
            } else {
                println!("requeued {id} for {}", printable(&consumer));
            }
            Ok(exit::OK)
        }
    }
}

/// `outbox dead list|requeue|purge`.
async fn dead(store: &AnyStore, command: DeadCommand, json: bool) -> Result<u8, Error> {
    store.require_table().await?;
    let s = store.store();
    match command {
        DeadCommand::List {
            stream,
            limit,
            before,
        } => {
            // Newest first, a page at a time, as the console lists them.
            let filter = outbox_core::MessageFilter {
                stream,
                status: Some(outbox_core::Status::Dead),
                before,
                limit,
                ..Default::default()
            };
            filter.validate()?;
            let dead = s.messages(&filter).await?;
            if json {
                println!("{}", json::messages(&dead, limit, false));
                return Ok(exit::OK);
            }
            for m in dead {
                println!(
                    "seq={} id={} stream={} destination={} attempts={} error={}",
                    m.seq,
                    m.envelope.id,
                    printable(&m.envelope.message.stream),
                    printable(&m.envelope.message.destination),
                    m.attempts,
                    printable(&m.last_error.unwrap_or_default())
                );
            }
            Ok(exit::OK)
        }
        DeadCommand::Requeue(sel) => bulk_dead(s, &sel, true, json).await,
        DeadCommand::Purge(sel) => bulk_dead(s, &sel, false, json).await,
    }
}

/// Requeue (or purge) dead letters. `--seq` rows in one statement; `--all` and `--stream` in
/// batches of [`BULK_BATCH`] with progress, each batch its own statement, so Ctrl-C stops
/// between two batches with every row either changed or not.
pub(crate) async fn bulk_dead(
    s: Arc<dyn StoreAdmin>,
    sel: &SelectArgs,
    requeue: bool,
    json: bool,
) -> Result<u8, Error> {
    let verb = if requeue { "requeued" } else { "purged" };
    let apply = |selector: Selector| {
        let s = s.clone();
        async move {
            if requeue {
                s.requeue(&selector).await
            } else {
                s.purge_dead(&selector).await
            }
        }
    };
    let (n, finished) = if !sel.seqs.is_empty() {
        (apply(sel.selector()).await?, true)
    } else {
        let interrupt = report::Interrupt::catch();
        let mut progress = report::Progress::new(if requeue { "requeue" } else { "purge" });
        let mut n = 0;
        let finished = loop {
            let batch: Vec<i64> = s
                .dead_letters(sel.stream.as_deref(), BULK_BATCH)
                .await?
                .iter()
                .map(|m| m.seq)
                .collect();
            if batch.is_empty() {
                break true;
            }
            let changed = apply(Selector::Seqs(batch)).await?;
            if changed == 0 {
                // Rows listed but not changed (another operator got there first): done.
                break true;
            }
            n += changed;
            progress.update(n);
            if interrupt.asked() {
                break false;
            }
        };
        progress.finish();
        (n, finished)
    };
    if json {
        println!("{}", serde_json::json!({ verb: n, "finished": finished }));
    } else if finished {
        println!("{verb} {n}");
    } else {
        println!("{verb} {n}, then stopped (interrupted); run it again to go on");
    }
    Ok(if finished {
        exit::OK
    } else {
        exit::INTERRUPTED
    })
}

/// Rows per statement of `dead requeue --all` / `dead purge --all`.
const BULK_BATCH: usize = 500;
