//! `outbox admin`: the web console.

use super::*;

/// `outbox admin`: the console, until a stop signal.
pub(super) async fn admin_console(
    store: &AnyStore,
    store_url: &str,
    table: &str,
    args: AdminArgs,
) -> Result<u8, Error> {
    let mut options = options_of(&args)?;
    options.wal_slot = match (args.wal, store) {
        (false, _) => None,
        (true, AnyStore::Postgres(pg)) => Some((pg.pool().clone(), args.wal_names.slot.clone())),
        (true, _) => {
            return Err(Error::config(
                "--wal: the WAL relay is PostgreSQL's; the store must be postgres://…",
            ))
        }
    };
    admin::check(&options)?;
    store.require_table().await?;
    let label = outbox_core::redact_url(store_url);
    admin::serve(store.store(), table, label, options, stop_signal()).await?;
    Ok(exit::OK)
}

/// `outbox admin --stores FILE`: every store of the list, read once and opened at once (each
/// within 10 s); a store that cannot be opened is shown with the reason, the others served.
pub(crate) async fn admin_stores(
    source: crate::fleet_cmd::Source,
    table: &str,
    args: AdminArgs,
) -> Result<u8, Error> {
    let options = options_of(&args)?;
    admin::check(&options)?;
    let members = source.read(table).await?;
    let opens = members.into_iter().map(|(name, m)| async move {
        let store = match tokio::time::timeout(Duration::from_secs(10), m.open()).await {
            Ok(Ok(store)) => Ok(Arc::new(store) as Arc<dyn StoreAdmin>),
            Ok(Err(e)) => Err(crate::report::describe(&e)),
            Err(_) => Err("no answer within 10 s".to_owned()),
        };
        if let Err(why) = &store {
            tracing::warn!(store = %outbox_core::printable(&name), error = %why, "admin: a store of the list cannot be opened");
        }
        admin::Listed {
            label: outbox_core::redact_url(&m.url),
            table: m.table.clone(),
            name,
            store,
        }
    });
    let listed = futures_util::future::join_all(opens).await;
    admin::serve_stores(listed, options, stop_signal()).await?;
    Ok(exit::OK)
}

/// The console's settings from its flags (the token read from its file).
fn options_of(args: &AdminArgs) -> Result<admin::AdminOptions, Error> {
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
    Ok(admin::AdminOptions {
        listen: args.listen,
        token,
        read_only: args.read_only,
        hide_payloads: args.hide_payloads,
        sample_every: args.sample_every.max(Duration::from_millis(100)),
        wal_slot: None,
    })
}

/// Resolves on Ctrl-C or SIGTERM.
async fn stop_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match term.as_mut() {
                Some(t) => { t.recv().await; }
                None => std::future::pending::<()>().await,
            }
        } => {}
    }
}
