//! `outbox grants`: the GRANT statements of each least-privilege role.

use super::*;

/// `outbox grants`: the GRANTs of each role, printed.
pub(super) fn grants(
    store_url: &str,
    table: &str,
    args: &GrantsArgs,
    output: Output,
) -> Result<u8, Error> {
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
        "postgres" | "postgresql" => {
            let mut all = outbox_sql::roles::postgres(table, &roles)?;
            if args.wal {
                all.extend(outbox_sql::roles::postgres_wal(
                    table,
                    &roles,
                    args.wal_rows,
                )?);
            }
            all
        }
        _ if args.wal => {
            return Err(Error::config(
                "grants --wal: the WAL relay is PostgreSQL's; the store must be postgres://…",
            ))
        }
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
