//! Every statement of the SQLite store, built once per table: each one written whole by its
//! own function, none derived from another by replacing text.

use super::*;

pub(super) struct Sql {
    pub(super) schema: String,
    pub(super) insert: String,
    /// Give keep-order rows whose unit `<table>_due` does not know (written by an older
    /// version, by SQL, or moved by hand) their unit: one index probe per distinct unit.
    pub(super) adopt: String,
    pub(super) get: String,
    pub(super) table: String,
}

impl Sql {
    pub(super) fn new(t: &str) -> Self {
        Self {
            schema: schema(t),
            insert: insert(t),
            adopt: adopt(t),
            get: format!("SELECT {} FROM {t} WHERE seq = ?1", cols("payload")),
            table: t.to_owned(),
        }
    }
}

/// The tables and indexes, then the adoption of rows whose unit `<table>_due` does not know.
fn schema(t: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {t} (
                    seq INTEGER PRIMARY KEY AUTOINCREMENT,
                    id TEXT NOT NULL UNIQUE,
                    stream TEXT NOT NULL,
                    destination TEXT NOT NULL,
                    msg_key TEXT,
                    okey TEXT NOT NULL,
                    payload BLOB NOT NULL,
                    content_type TEXT NOT NULL,
                    headers TEXT NOT NULL,
                    strategy TEXT NOT NULL,
                    status TEXT NOT NULL,
                    attempts INTEGER NOT NULL DEFAULT 0,
                    created_at INTEGER NOT NULL,
                    next_attempt_at INTEGER NOT NULL,
                    locked_by TEXT,
                    locked_until INTEGER,
                    last_error TEXT,
                    sent_at INTEGER,
                    signature TEXT,
                    on_exhausted TEXT,
                    claims INTEGER NOT NULL DEFAULT 0
                );
                CREATE INDEX IF NOT EXISTS {t}_unit ON {t} (stream, okey, seq) WHERE status = 'pending';
                CREATE INDEX IF NOT EXISTS {t}_oc ON {t} (next_attempt_at) WHERE status = 'pending' AND strategy = 'on_commit';
                CREATE INDEX IF NOT EXISTS {t}_sent ON {t} (sent_at) WHERE status = 'sent';
                CREATE INDEX IF NOT EXISTS {t}_dead ON {t} (created_at) WHERE status = 'dead';
                DROP INDEX IF EXISTS {t}_leased;
                DROP INDEX IF EXISTS {t}_backoff;
                CREATE TABLE IF NOT EXISTS {t}_due (
                    stream TEXT NOT NULL,
                    okey TEXT NOT NULL,
                    next_at INTEGER NOT NULL,
                    leased_by TEXT,
                    parked_at INTEGER,
                    parked_reason TEXT,
                    claims INTEGER NOT NULL DEFAULT 0,
                    PRIMARY KEY (stream, okey)
                );
                CREATE INDEX IF NOT EXISTS {t}_due_next ON {t}_due (next_at);
                CREATE INDEX IF NOT EXISTS {t}_due_parked ON {t}_due (parked_at) WHERE parked_at IS NOT NULL;
                UPDATE {t} SET next_attempt_at = locked_until
                  WHERE status = 'pending' AND strategy = 'on_commit' AND locked_until > next_attempt_at;
                {adopt}",
        adopt = adopt(t)
    )
}

fn insert(t: &str) -> String {
    format!(
        "INSERT INTO {t} (id, stream, destination, msg_key, okey, payload, content_type, headers, strategy,
                    status, attempts, created_at, next_attempt_at, locked_by, locked_until, last_error, signature,
                    on_exhausted)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)"
    )
}

fn adopt(t: &str) -> String {
    format!(
        "WITH RECURSIVE walk(seq) AS (
                   SELECT (SELECT seq FROM {t} WHERE status = 'pending' ORDER BY stream, okey LIMIT 1)
                   UNION ALL
                   SELECT (SELECT o.seq FROM {t} o, {t} w0 WHERE w0.seq = walk.seq AND o.status = 'pending'
                             AND (o.stream, o.okey) > (w0.stream, w0.okey) ORDER BY o.stream, o.okey LIMIT 1)
                   FROM walk WHERE walk.seq IS NOT NULL)
                 INSERT OR IGNORE INTO {t}_due (stream, okey, next_at)
                 SELECT w.stream, w.okey, 0 FROM {t} w WHERE w.seq IN (SELECT seq FROM walk)
                   AND EXISTS (SELECT 1 FROM {t} o WHERE o.stream = w.stream AND o.okey = w.okey
                               AND o.status = 'pending' AND o.strategy <> 'on_commit')"
    )
}

/// Mark `n` published rows sent (`?1` the time, then their `seq`s), or delete them (their
/// `seq`s from `?1`).
pub(super) fn complete(t: &str, delete: bool, n: usize) -> String {
    if delete {
        format!("DELETE FROM {t} WHERE seq IN ({})", placeholders(n, 1))
    } else {
        format!(
            "UPDATE {t} SET status = 'sent', sent_at = ?1, locked_by = NULL, locked_until = NULL WHERE seq IN ({})",
            placeholders(n, 2)
        )
    }
}

/// The table of applied schema steps (see [`outbox_core::SCHEMA_STEPS`]).
pub(super) fn versions(t: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {t}_schema (
            version INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            applied_at INTEGER NOT NULL
        )"
    )
}

/// Records `step` as applied at `?1` (once: a concurrent migrate's record stands).
pub(super) fn record_version(t: &str, step: &outbox_core::SchemaStep) -> String {
    format!(
        "INSERT OR IGNORE INTO {t}_schema (version, name, applied_at)
         VALUES ({}, '{}', ?1)",
        step.version,
        step.name.replace('\'', "''")
    )
}
