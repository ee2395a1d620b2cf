//! What the PostgreSQL and MySQL stores share: error mapping, row decoding, URL redaction.

use std::collections::BTreeMap;

use outbox_core::{
    from_millis, Envelope, Error, ErrorKind, Message, MessageId, Retry, StoredMessage,
};
use sqlx::Row;

/// Map a sqlx error: connection and pool problems, deadlocks, serialization failures and
/// lock timeouts are transient; the rest is permanent.
pub fn map_err(e: sqlx::Error) -> Error {
    let (kind, retry) = match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => (ErrorKind::Store, Retry::Transient),
        sqlx::Error::Configuration(_) | sqlx::Error::Tls(_) => {
            (ErrorKind::Config, Retry::Permanent)
        }
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // PostgreSQL: serialization failure, deadlock, lock timeout, admin shutdown, cannot
            // connect now; MySQL/MariaDB (by error number): lock wait timeout, deadlock, server
            // gone.
            let transient = matches!(
                &*code,
                "40001" | "40P01" | "55P03" | "57P01" | "57P03" | "08006" | "08003"
            ) || code.starts_with("08")
                || mysql_number(db.as_ref())
                    .is_some_and(|n| matches!(n, 1205 | 1213 | 2006 | 2013));
            (
                ErrorKind::Store,
                if transient {
                    Retry::Transient
                } else {
                    Retry::Permanent
                },
            )
        }
        _ => (ErrorKind::Store, Retry::Permanent),
    };
    Error::new(kind, retry, "database error").with_source(e)
}

pub use outbox_core::redact_url;

/// A pool to `url` for a store, after a probe connection (see [`probe`]) so that a refused
/// login is a configuration error at once; errors name the database by `database` and the
/// URL without its password.
pub(crate) async fn open_pool<DB: sqlx::Database>(
    pool: sqlx::pool::PoolOptions<DB>,
    connect: <DB::Connection as sqlx::Connection>::Options,
    max_connections: u32,
    acquire_timeout: std::time::Duration,
    url: &str,
    database: &str,
) -> outbox_core::Result<sqlx::Pool<DB>> {
    probe::<DB::Connection>(&connect, acquire_timeout, url, database).await?;
    pool.max_connections(max_connections)
        .acquire_timeout(acquire_timeout)
        .connect_with(connect)
        .await
        .map_err(|e| {
            let mapped = map_err(e);
            Error::new(
                mapped.kind(),
                Retry::Transient,
                format!("cannot connect to {database} at {}", redact_url(url)),
            )
            .with_source(mapped)
        })
}

/// Open one connection before the pool, so that a server that is down or refuses us is
/// reported at once with its cause ("connection refused", "password authentication
/// failed"), not as "pool timed out" after the acquire timeout. A refused login is a
/// permanent `Config` error (the URL's credentials are wrong: retrying cannot help); anything
/// else is transient, as before.
pub(crate) async fn probe<C: sqlx::Connection>(
    options: &<C as sqlx::Connection>::Options,
    within: std::time::Duration,
    url: &str,
    database: &str,
) -> outbox_core::Result<()> {
    let unreachable = |source: Error| {
        Error::new(
            ErrorKind::Store,
            Retry::Transient,
            format!("cannot connect to {database} at {}", redact_url(url)),
        )
        .with_source(source)
    };
    match tokio::time::timeout(within, C::connect_with(options)).await {
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            Ok(())
        }
        Ok(Err(e)) => {
            let refused = matches!(&e, sqlx::Error::Database(db)
                if matches!(db.code().as_deref(), Some("28P01" | "28000"))
                    || mysql_login_refused(db.as_ref()));
            let mapped = map_err(e);
            Err(if refused {
                Error::new(
                    ErrorKind::Config,
                    Retry::Permanent,
                    format!(
                        "{database} at {} refused the login (user or password)",
                        redact_url(url)
                    ),
                )
                .with_source(mapped)
            } else {
                unreachable(mapped)
            })
        }
        Err(_) => Err(unreachable(Error::transient(format!(
            "no connection within {within:?}"
        )))),
    }
}

/// MySQL's "access denied" errors (1044 database, 1045 user or password).
fn mysql_login_refused(db: &dyn sqlx::error::DatabaseError) -> bool {
    #[cfg(feature = "mysql")]
    {
        mysql_number(db).is_some_and(|n| matches!(n, 1044 | 1045))
    }
    #[cfg(not(feature = "mysql"))]
    {
        let _ = db;
        false
    }
}

/// MySQL's error number (its SQLSTATE is often just `HY000`).
#[cfg(feature = "mysql")]
fn mysql_number(db: &dyn sqlx::error::DatabaseError) -> Option<u16> {
    db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
        .map(|e| e.number())
}

#[cfg(not(feature = "mysql"))]
fn mysql_number(_: &dyn sqlx::error::DatabaseError) -> Option<u16> {
    None
}

/// Decode one row (columns in the order of the stores' `cols`); the error names the column
/// that does not decode. Rows are input: another service, an operator or an attacker may
/// have written them.
pub(crate) fn decode<R>(row: &R) -> Result<StoredMessage, String>
where
    R: Row,
    usize: sqlx::ColumnIndex<R>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i32: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    fn col<R, T>(row: &R, i: usize, name: &str) -> Result<T, String>
    where
        R: Row,
        usize: sqlx::ColumnIndex<R>,
        T: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    {
        row.try_get(i).map_err(|e| match e {
            sqlx::Error::ColumnDecode { source, .. } => format!("column {name}: {source}"),
            other => format!("column {name}: {other}"),
        })
    }
    let id: String = col(row, 1, "id")?;
    let headers: String = col(row, 7, "headers")?;
    let headers: BTreeMap<String, String> = serde_json::from_str(&headers)
        .map_err(|e| format!("column headers: not a JSON object of strings: {e}"))?;
    let strategy: String = col(row, 8, "strategy")?;
    let status: String = col(row, 9, "status")?;
    let attempts: i32 = col(row, 10, "attempts")?;
    let key: Option<String> = col::<R, Option<String>>(row, 4, "msg_key")?;
    let unit: String = col(row, 16, "okey")?;
    let exhausted: Option<String> = col(row, 17, "on_exhausted")?;
    Ok(StoredMessage {
        seq: col(row, 0, "seq")?,
        envelope: Envelope {
            id: id
                .trim()
                .parse::<MessageId>()
                .map_err(|_| format!("column id: {id:?} is not a UUID"))?,
            created_at: from_millis(col(row, 11, "created_at")?),
            message: Message {
                stream: col(row, 2, "stream")?,
                destination: col(row, 3, "destination")?,
                key,
                payload: col(row, 5, "payload")?,
                content_type: col(row, 6, "content_type")?,
                headers,
                schedule: None,
            },
        },
        order: strategy
            .parse()
            .map_err(|_| format!("column strategy: unknown strategy {strategy:?}"))?,
        unit,
        exhausted: outbox_core::Exhausted::from_stored(exhausted.as_deref())
            .map_err(|e| format!("column on_exhausted: {e}"))?,
        status: status
            .parse()
            .map_err(|_| format!("column status: unknown status {status:?}"))?,
        attempts: u32::try_from(attempts)
            .map_err(|_| format!("column attempts: {attempts} is negative"))?,
        next_attempt_at: from_millis(col(row, 12, "next_attempt_at")?),
        last_error: col(row, 13, "last_error")?,
        sent_at: col::<R, Option<i64>>(row, 14, "sent_at")?.map(from_millis),
        signature: col(row, 15, "signature")?,
        claims: 0,
    })
}

/// A claimed row: decoded, or quarantined with the reason. A claim's rows carry their size
/// after the decoded columns (index 18), and no payload when it is over the row limit.
pub(crate) fn claimed<R>(
    row: &R,
    claim: &outbox_core::Claim,
) -> outbox_core::Result<outbox_core::Claimed>
where
    R: Row,
    usize: sqlx::ColumnIndex<R>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i32: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let seq: i64 = row.try_get(0).map_err(map_err)?; // the primary key: always an integer
    let id = || row.try_get::<String, _>(1).ok();
    if let Ok(None) = row.try_get::<Option<Vec<u8>>, _>(5) {
        let size = row
            .try_get::<i64, _>(18)
            .or_else(|_| row.try_get::<i32, _>(18).map(i64::from))
            .unwrap_or(-1);
        return Ok(Err(outbox_core::Quarantined {
            seq,
            id: id(),
            reason: claim.oversized(size.max(0) as usize),
        }));
    }
    // After the size: how many times the row (its unit) was claimed without an outcome.
    let claims = row
        .try_get::<i32, _>(19)
        .map(i64::from)
        .or_else(|_| row.try_get::<i64, _>(19))
        .unwrap_or(0);
    Ok(decode(row)
        .map(|mut m| {
            m.claims = claims.clamp(0, u32::MAX as i64) as u32;
            m
        })
        .map_err(|reason| outbox_core::Quarantined {
            seq,
            id: id(),
            reason,
        }))
}

/// A row for listings: decoded, or a placeholder that keeps its status and error.
pub(crate) fn listed<R>(row: &R) -> outbox_core::Result<StoredMessage>
where
    R: Row,
    usize: sqlx::ColumnIndex<R>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i32: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let seq: i64 = row.try_get(0).map_err(map_err)?;
    Ok(decode(row).unwrap_or_else(|why| {
        let status = row
            .try_get::<String, _>(9)
            .ok()
            .and_then(|s| s.parse().ok());
        let error = row.try_get::<Option<String>, _>(13).ok().flatten();
        StoredMessage::unreadable(seq, status, error, &why)
    }))
}

/// Per-stream counts from rows of (stream, pending, sent, dead, oldest pending ms).
pub(crate) fn stats_from_rows(
    rows: Vec<(String, i64, i64, i64, Option<i64>)>,
) -> outbox_core::Stats {
    outbox_core::Stats {
        streams: rows
            .into_iter()
            .map(
                |(stream, pending, sent, dead, oldest)| outbox_core::StreamStats {
                    stream,
                    pending: pending as u64,
                    sent: sent as u64,
                    dead: dead as u64,
                    oldest_pending: oldest.map(from_millis),
                },
            )
            .collect(),
    }
}

/// `bytes` as lowercase hex, appended to `out`: how values travel inside the text of a simple
/// query (no parameters there), in a form no quote or backslash can break out of.
#[cfg(feature = "postgres")]
pub(crate) fn push_hex(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.reserve(bytes.len() * 2);
    for &b in bytes {
        out.push(HEX[usize::from(b >> 4)] as char);
        out.push(HEX[usize::from(b & 15)] as char);
    }
}

/// The distinct keep-order units of a batch, sorted (a fixed lock order avoids deadlocks
/// between two transactions that write the same units).
pub(crate) fn keep_order_units(rows: &[outbox_core::NewMessage]) -> Vec<(String, String)> {
    let mut units: Vec<(String, String)> = rows
        .iter()
        .filter(|r| r.order == outbox_core::Order::InUnit)
        .map(|r| (r.envelope.message.stream.clone(), r.unit.clone()))
        .collect();
    units.sort();
    units.dedup();
    units
}

/// The TLS parameters of one dialect's URL: the mode's name and accepted values, and the
/// names of the CA, client certificate and client key files (each with its aliases).
pub(crate) struct TlsParams {
    pub mode: (&'static [&'static str], &'static [&'static str]),
    pub ca: &'static [&'static str],
    pub cert: &'static [&'static str],
    pub key: &'static [&'static str],
    /// Modes that need TLS (a configuration error when the crate is built without it).
    pub needs_tls: &'static [&'static str],
}

#[cfg(feature = "postgres")]
pub(crate) const PG_TLS: TlsParams = TlsParams {
    mode: (
        &["sslmode", "ssl-mode"],
        &[
            "disable",
            "allow",
            "prefer",
            "require",
            "verify-ca",
            "verify-full",
        ],
    ),
    ca: &["sslrootcert", "ssl-root-cert", "ssl-ca"],
    cert: &["sslcert", "ssl-cert"],
    key: &["sslkey", "ssl-key"],
    needs_tls: &["require", "verify-ca", "verify-full"],
};

#[cfg(feature = "mysql")]
pub(crate) const MYSQL_TLS: TlsParams = TlsParams {
    mode: (
        &["ssl-mode", "sslmode"],
        &[
            "disabled",
            "preferred",
            "required",
            "verify_ca",
            "verify_identity",
        ],
    ),
    ca: &["ssl-ca", "sslca"],
    cert: &["ssl-cert", "sslcert"],
    key: &["ssl-key", "sslkey"],
    needs_tls: &["required", "verify_ca", "verify_identity"],
};

/// Check a store URL's TLS parameters before connecting: an unsupported mode, or a CA,
/// certificate or key file that is missing, unreadable or not PEM, is a `Config` error naming
/// the parameter (at start-up, not at the first connection the pool opens).
pub(crate) fn check_tls_params(url: &str, p: &TlsParams) -> outbox_core::Result<()> {
    use outbox_core::tls::{read_pem, take_params, PemKind};
    let names: Vec<&str> = [p.mode.0, p.ca, p.cert, p.key].concat();
    let (_, params) = take_params(url, &names);
    let mut has_cert = None;
    let mut has_key = None;
    for (name, value) in &params {
        if p.mode.0.contains(&name.as_str()) {
            let mode = value.to_ascii_lowercase();
            if !p.mode.1.contains(&mode.as_str()) {
                return Err(outbox_core::Error::config(format!(
                    "{name}={value:?} is not supported: use one of {}",
                    p.mode.1.join(", ")
                )));
            }
            if !cfg!(feature = "tls") && p.needs_tls.contains(&mode.as_str()) {
                return Err(outbox_core::Error::config(format!(
                    "{name}={value} needs outbox-sql's `tls` feature (on by default)"
                )));
            }
        } else if p.ca.contains(&name.as_str()) {
            read_pem(name, value.as_ref(), PemKind::Certificates)?;
        } else if p.cert.contains(&name.as_str()) {
            read_pem(name, value.as_ref(), PemKind::Certificates)?;
            has_cert = Some(name.clone());
        } else {
            read_pem(name, value.as_ref(), PemKind::PrivateKey)?;
            has_key = Some(name.clone());
        }
    }
    match (has_cert, has_key) {
        (Some(c), None) => Err(outbox_core::Error::config(format!(
            "{c} needs a client key ({})",
            p.key[0]
        ))),
        (None, Some(k)) => Err(outbox_core::Error::config(format!(
            "{k} needs a client certificate ({})",
            p.cert[0]
        ))),
        _ => Ok(()),
    }
}

/// Roll `tx` back now and return `error`. A dropped sqlx transaction only queues its
/// rollback for the connection's next use, and until then its row locks stay: a claim with
/// SKIP LOCKED would pass over a unit an operator's failed `resume` merely looked at.
pub(crate) async fn rolled_back<DB: sqlx::Database>(
    tx: sqlx::Transaction<'_, DB>,
    error: outbox_core::Error,
) -> outbox_core::Error {
    if let Err(e) = tx.rollback().await {
        tracing::warn!(error = %e, "rollback failed; the connection is dropped");
    }
    error
}

/// The WHERE conditions of a [`outbox_core::MessageFilter`], with `placeholder(n)` for the
/// n-th (1-based) bound value, and the values (text, or a `seq`).
pub(crate) fn filter_clause(
    f: &outbox_core::MessageFilter,
    placeholder: impl Fn(usize, &str) -> String,
) -> (String, Vec<FilterValue>) {
    let mut clause = String::new();
    let mut values = Vec::new();
    let mut add = |column: &str, value: FilterValue| {
        values.push(value);
        clause.push_str(&format!(
            " AND {column} = {}",
            placeholder(values.len(), column)
        ));
    };
    if let Some(s) = &f.stream {
        add("stream", FilterValue::Text(s.clone()));
    }
    if let Some(s) = f.status {
        add("status", FilterValue::Text(s.as_str().to_owned()));
    }
    if let Some(k) = &f.key {
        add("msg_key", FilterValue::Text(k.clone()));
    }
    if let Some(id) = f.id {
        add("id", FilterValue::Text(id.to_string()));
    }
    if let Some(d) = &f.destination {
        add("destination", FilterValue::Text(d.clone()));
    }
    if let Some(b) = f.before {
        values.push(FilterValue::Seq(b));
        clause.push_str(&format!(" AND seq < {}", placeholder(values.len(), "seq")));
    }
    (clause, values)
}

/// A value bound by [`filter_clause`]'s conditions.
pub(crate) enum FilterValue {
    Text(String),
    Seq(i64),
}

/// Bookkeeping a claim leaves to the background (forgetting empty units), at most one task
/// at a time per store: a claim that finds one running leaves its work to a later claim,
/// which finds the same units again. A failure is logged, never returned: nothing waits for it.
#[derive(Default)]
pub(crate) struct Background(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Background {
    pub(crate) fn run<F>(&self, work: F)
    where
        F: std::future::Future<Output = outbox_core::Result<()>> + Send + 'static,
    {
        use std::sync::atomic::Ordering;
        if self.0.swap(true, Ordering::AcqRel) {
            return;
        }
        /// Clears the flag however the task ends (cancelled with its runtime included).
        struct Done(std::sync::Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Done {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let done = Done(self.0.clone());
        tokio::spawn(async move {
            let _done = done;
            if let Err(e) = work.await {
                tracing::debug!(error = %e, "background bookkeeping failed; a later claim does it");
            }
        });
    }
}
