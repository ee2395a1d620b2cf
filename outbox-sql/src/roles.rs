//! Least-privilege roles: the `GRANT`s each part of a deployment needs on an outbox's tables,
//! so the writer, the relay and the console can run as database roles of their own, none of
//! them the tables' owner (who alone runs `migrate`).
//!
//! - **writer** (the application): inserts outbox rows and takes its ordering units' locks.
//!   It reads back only the `seq` and `id` of what it wrote: never a payload, and it can
//!   change or delete no row. (A writer that publishes on commit settles its own rows: give
//!   its role the relay's grants too.)
//! - **relay**: claims, settles and deletes rows and keeps the unit tables; it cannot insert
//!   a message or change a message's content (destination, payload, headers, signature).
//! - **admin** (the console, `dead`, `park`, `resume`, `skip`): reads everything, requeues and
//!   purges dead letters, parks and resumes units; it cannot insert a message, change a
//!   message's content or mark one sent.
//!
//! Granted per column where the database allows it. Row-level limits (the console changing
//! dead rows only) would need PostgreSQL's row security; they are not granted here.

use outbox_core::{validate_identifier, Error, Result};

/// The roles to grant to; each may be left out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Roles {
    /// The application's role.
    pub writer: Option<String>,
    /// The relay's role.
    pub relay: Option<String>,
    /// The console's (and the operator commands') role.
    pub admin: Option<String>,
}

/// Columns an insert writes (the same on both databases).
const INSERT_COLS: &str =
    "id, stream, destination, msg_key, okey, payload, content_type, headers, \
     strategy, status, attempts, created_at, next_attempt_at, locked_by, locked_until, last_error, \
     signature, on_exhausted";
/// Columns a relay changes: leases, attempts, outcomes.
const RELAY_UPDATES: &str = "status, attempts, next_attempt_at, locked_by, locked_until, \
     last_error, sent_at, claims";
/// Columns the console changes: a dead letter's state (requeue, skip), never its content or
/// `sent_at`.
const ADMIN_UPDATES: &str =
    "status, attempts, next_attempt_at, locked_by, locked_until, last_error";

fn check_role(role: &str, what: &str) -> Result<()> {
    let ok = !role.is_empty()
        && role.len() <= 63
        && role
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(Error::config(format!(
            "{what} role {:?}: use 1-63 ASCII letters, digits, '_' or '-'",
            role.chars().take(64).collect::<String>()
        )))
    }
}

/// PostgreSQL: the statements, in order, for `table` (in the search path's schema).
pub fn postgres(table: &str, roles: &Roles) -> Result<Vec<String>> {
    validate_identifier(table)?;
    let t = table;
    let mut out = Vec::new();
    if let Some(w) = &roles.writer {
        check_role(w, "writer")?;
        let w = format!("\"{w}\"");
        out.extend([
            format!("GRANT INSERT ({INSERT_COLS}) ON {t} TO {w}"),
            format!("GRANT SELECT (seq, id) ON {t} TO {w}"),
            format!("GRANT USAGE ON SEQUENCE {t}_seq_seq TO {w}"),
            format!("GRANT SELECT (stream, okey), INSERT (stream, okey), UPDATE (okey) ON {t}_units TO {w}"),
            format!("GRANT SELECT (stream, okey), INSERT (stream, okey, next_at) ON {t}_due TO {w}"),
        ]);
    }
    for (role, what, updates) in [
        (&roles.relay, "relay", RELAY_UPDATES),
        (&roles.admin, "admin", ADMIN_UPDATES),
    ] {
        if let Some(r) = role {
            check_role(r, what)?;
            let r = format!("\"{r}\"");
            out.extend([
                format!("GRANT SELECT, DELETE ON {t} TO {r}"),
                format!("GRANT UPDATE ({updates}) ON {t} TO {r}"),
                format!("GRANT SELECT, INSERT, UPDATE, DELETE ON {t}_units, {t}_due TO {r}"),
                format!("GRANT SELECT ON {t}_schema TO {r}"),
            ]);
        }
    }
    Ok(out)
}

/// PostgreSQL with the WAL relay (`postgres::wal`), after [`postgres`]'s statements:
/// - any role may call `pg_logical_emit_message` by default, so any login could hand the
///   relay a message: only the writer may (run as a superuser: the function is the
///   system's);
/// - the writer needs nothing else (no table privilege);
/// - the relay reads the slot (`REPLICATION`) and writes refused messages and the units
///   behind them to the table, so it also inserts rows: the one privilege the WAL relay adds
///   to the polling relay's.
///
/// In table mode (`rows`, [`WalStore::rows`](crate::postgres::wal::WalStore::rows)) the
/// writer inserts into `<table>_wal` instead, and the relay deletes the rows it published.
pub fn postgres_wal(table: &str, roles: &Roles, rows: bool) -> Result<Vec<String>> {
    validate_identifier(table)?;
    let t = table;
    let emit = "FUNCTION pg_logical_emit_message(boolean, text, bytea)";
    let emit_text = "FUNCTION pg_logical_emit_message(boolean, text, text)";
    let mut out = vec![
        format!("REVOKE EXECUTE ON {emit} FROM PUBLIC"),
        format!("REVOKE EXECUTE ON {emit_text} FROM PUBLIC"),
    ];
    if let Some(w) = &roles.writer {
        check_role(w, "writer")?;
        if rows {
            out.extend([
                format!("GRANT INSERT (batch) ON {t}_wal TO \"{w}\""),
                format!("GRANT USAGE ON SEQUENCE {t}_wal_seq_seq TO \"{w}\""),
            ]);
        } else {
            out.push(format!("GRANT EXECUTE ON {emit} TO \"{w}\""));
        }
    }
    if let Some(r) = &roles.relay {
        check_role(r, "relay")?;
        out.extend([
            format!("ALTER ROLE \"{r}\" REPLICATION"),
            format!("GRANT INSERT ({INSERT_COLS}) ON {t} TO \"{r}\""),
            format!("GRANT USAGE ON SEQUENCE {t}_seq_seq TO \"{r}\""),
        ]);
        if rows {
            out.push(format!("GRANT SELECT, DELETE ON {t}_wal TO \"{r}\""));
        }
    }
    Ok(out)
}

/// MySQL / MariaDB: the statements for `table` in `database`, to accounts `'role'@'host'`
/// (`host`: `%` for any).
pub fn mysql(database: &str, table: &str, host: &str, roles: &Roles) -> Result<Vec<String>> {
    validate_identifier(table)?;
    if database.is_empty() || database.contains(['`', '\0']) {
        return Err(Error::config(format!(
            "database name {:?} cannot be quoted",
            database.chars().take(64).collect::<String>()
        )));
    }
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".%_-:".contains(c));
    if !host_ok {
        return Err(Error::config(format!(
            "account host {:?}: use letters, digits and . % _ - :",
            host.chars().take(64).collect::<String>()
        )));
    }
    let t = format!("`{database}`.{table}");
    let mut out = Vec::new();
    let account = |r: &str| format!("'{r}'@'{host}'");
    if let Some(w) = &roles.writer {
        check_role(w, "writer")?;
        let w = account(w);
        out.extend([
            format!("GRANT INSERT ({INSERT_COLS}), SELECT (seq, id) ON {t} TO {w}"),
            // The unit locks hold no message data; `SELECT ... FOR UPDATE` on them needs
            // UPDATE on the columns it reads.
            format!("GRANT SELECT, INSERT, UPDATE ON {t}_locks TO {w}"),
            format!(
                "GRANT SELECT (stream, okey), INSERT (stream, okey, next_at) ON {t}_due TO {w}"
            ),
        ]);
    }
    for (role, what, updates) in [
        (&roles.relay, "relay", RELAY_UPDATES),
        (&roles.admin, "admin", ADMIN_UPDATES),
    ] {
        if let Some(r) = role {
            check_role(r, what)?;
            let r = account(r);
            out.extend([
                format!("GRANT SELECT, DELETE, UPDATE ({updates}) ON {t} TO {r}"),
                format!("GRANT SELECT, INSERT, UPDATE, DELETE ON {t}_locks TO {r}"),
                format!("GRANT SELECT, INSERT, UPDATE, DELETE ON {t}_due TO {r}"),
                format!("GRANT SELECT ON {t}_schema TO {r}"),
            ]);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        let roles = |w: &str| Roles {
            writer: Some(w.into()),
            ..Default::default()
        };
        assert!(postgres("outbox", &roles("app_writer")).is_ok());
        for bad in ["", "a\"b", "a b", "x;DROP", "a'b"] {
            assert!(postgres("outbox", &roles(bad)).is_err(), "{bad:?}");
            assert!(
                mysql("test", "outbox", "%", &roles(bad)).is_err(),
                "{bad:?}"
            );
        }
        assert!(postgres("bad name", &roles("w")).is_err());
        assert!(mysql("te`st", "outbox", "%", &roles("w")).is_err());
        assert!(mysql("test", "outbox", "a'b", &roles("w")).is_err());
        assert!(postgres("outbox", &Roles::default()).unwrap().is_empty());
    }
}
