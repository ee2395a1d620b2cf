//! `outbox admin`: the web console.

use super::*;

/// `outbox admin`: the console, until a stop signal.
pub(super) async fn admin_console(
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
        wal_slot: match (args.wal, store) {
            (false, _) => None,
            (true, AnyStore::Postgres(pg)) => {
                Some((pg.pool().clone(), args.wal_names.slot.clone()))
            }
            (true, _) => {
                return Err(Error::config(
                    "--wal: the WAL relay is PostgreSQL's; the store must be postgres://…",
                ))
            }
        },
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
